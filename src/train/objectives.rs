//! Objectives for the single-task path: a decoder on language modelling or prompt -> completion,
//! and an encoder with a linear classification head on mean-pooled states. Batch order is a
//! seeded permutation per epoch, a pure function of the step, so resumed runs replay exactly.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};

use super::trainer::Objective;
use crate::data::batch::{classification_batch, collate, Sequence};
use crate::data::Example;
use crate::eval::perplexity::Perplexity;
use crate::model::{Bert, Llama, TextTokenizer};
use crate::params::ParamStore;
use crate::peft::DeltaSet;
use crate::Result;

/// Which training items step `step`, micro-batch `micro` uses.
#[derive(Debug)]
pub struct BatchOrder {
    n: usize,
    batch: usize,
    accum: usize,
    seed: u64,
    perms: HashMap<usize, Vec<usize>>,
}

impl BatchOrder {
    pub fn new(n: usize, batch: usize, accum: usize, seed: u64) -> Self {
        Self {
            n,
            batch,
            accum,
            seed,
            perms: HashMap::new(),
        }
    }

    pub fn indices(&mut self, step: usize, micro: usize) -> Vec<usize> {
        let first = (step * self.accum + micro) * self.batch;
        (first..first + self.batch)
            .map(|g| {
                let epoch = g / self.n;
                let (n, seed) = (self.n, self.seed);
                let perm = self.perms.entry(epoch).or_insert_with(|| {
                    let mut p: Vec<usize> = (0..n).collect();
                    p.shuffle(&mut StdRng::seed_from_u64(
                        seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9),
                    ));
                    p
                });
                perm[g % n]
            })
            .collect()
    }
}

/// A decoder trained with next-token cross-entropy on `train`, evaluated by perplexity on `eval`.
pub struct DecoderLm<'a> {
    pub model: &'a Llama,
    pub base: &'a ParamStore,
    pub deltas: &'a DeltaSet,
    pub params: &'a ParamStore,
    pub train: Vec<Sequence>,
    pub eval: Vec<Sequence>,
    pub order: BatchOrder,
    pub pad: u32,
    pub last_tokens: usize,
}

impl DecoderLm<'_> {
    fn loss_of(&self, seqs: &[&Sequence]) -> Result<(Tensor, usize)> {
        let b = collate(seqs, self.pad)?;
        let logits = self.model.forward(
            self.base,
            self.deltas,
            self.params,
            &b.input_ids,
            Some(&b.attention_mask),
        )?;
        Ok((
            crate::ops::cross_entropy(&logits, &b.targets, -100)?,
            b.target_tokens,
        ))
    }

    /// Token-weighted perplexity on the evaluation sequences (no gradients kept).
    pub fn perplexity(&self, batch: usize) -> Result<Perplexity> {
        let mut p = Perplexity::default();
        self.deltas.set_training(false);
        for chunk in self.eval.chunks(batch.max(1)) {
            let refs: Vec<&Sequence> = chunk.iter().collect();
            let (loss, n) = self.loss_of(&refs)?;
            let l = loss.detach().to_dtype(DType::F64)?.to_scalar::<f64>()?;
            p.add(-l * n as f64, n);
        }
        Ok(p)
    }
}

impl Objective for DecoderLm<'_> {
    fn loss(&mut self, step: usize, micro: usize) -> Result<Tensor> {
        self.deltas.set_training(true);
        let idx = self.order.indices(step, micro);
        let seqs: Vec<&Sequence> = idx.iter().map(|&i| &self.train[i]).collect();
        let (loss, n) = self.loss_of(&seqs)?;
        self.last_tokens = n;
        Ok(loss)
    }

    fn evaluate(&mut self) -> Result<f64> {
        Ok(self.perplexity(8)?.value())
    }

    fn tokens(&self, _step: usize, _micro: usize) -> usize {
        self.last_tokens
    }
}

/// Head parameter names in the head store.
pub const HEAD_W: &str = "classifier.weight";
pub const HEAD_B: &str = "classifier.bias";

/// A fresh linear head `[labels, hidden]` (small uniform init, zero bias) as trainable `Var`s.
pub fn new_head(labels: usize, hidden: usize, seed: u64) -> Result<ParamStore> {
    let mut rng = StdRng::seed_from_u64(seed);
    let bound = 1.0 / (hidden as f64).sqrt();
    let w: Vec<f32> = (0..labels * hidden)
        .map(|_| rand::Rng::random_range(&mut rng, -bound..bound) as f32)
        .collect();
    let mut p = ParamStore::new();
    p.insert_trainable(
        HEAD_W,
        Var::from_tensor(&Tensor::from_vec(w, (labels, hidden), &Device::Cpu)?)?,
    );
    p.insert_trainable(
        HEAD_B,
        Var::from_tensor(&Tensor::zeros(labels, DType::F32, &Device::Cpu)?)?,
    );
    Ok(p)
}

/// An encoder with a linear head on mean-pooled token states.
pub struct EncoderClassifier<'a> {
    pub model: &'a Bert,
    pub tok: &'a TextTokenizer,
    pub base: &'a ParamStore,
    pub deltas: &'a DeltaSet,
    pub params: &'a ParamStore,
    pub head: &'a ParamStore,
    pub labels: Vec<String>,
    pub train: Vec<Example>,
    pub eval: Vec<Example>,
    pub order: BatchOrder,
    pub pad: u32,
}

impl EncoderClassifier<'_> {
    fn logits(&self, examples: &[&Example]) -> Result<(Tensor, Tensor)> {
        let (ids, mask, y) = classification_batch(self.tok, examples, &self.labels, self.pad)?;
        let states = self
            .model
            .forward(self.base, self.deltas, self.params, &ids, None, &mask)?;
        let m = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let pooled = states
            .broadcast_mul(&m)?
            .sum(1)?
            .broadcast_div(&m.sum(1)?.clamp(1.0, f64::INFINITY)?)?;
        let logits = crate::ops::linear(
            &pooled,
            self.head.get(HEAD_W)?,
            Some(self.head.get(HEAD_B)?),
        )?;
        Ok((logits, y))
    }

    /// Predicted label indices for the evaluation examples.
    pub fn predict(&self, batch: usize) -> Result<(Vec<usize>, Vec<usize>)> {
        self.deltas.set_training(false);
        let (mut pred, mut gold) = (vec![], vec![]);
        for chunk in self.eval.chunks(batch.max(1)) {
            let refs: Vec<&Example> = chunk.iter().collect();
            let (logits, y) = self.logits(&refs)?;
            pred.extend(
                logits
                    .detach()
                    .argmax(1)?
                    .to_vec1::<u32>()?
                    .into_iter()
                    .map(|x| x as usize),
            );
            gold.extend(y.to_vec1::<u32>()?.into_iter().map(|x| x as usize));
        }
        Ok((pred, gold))
    }
}

impl Objective for EncoderClassifier<'_> {
    fn loss(&mut self, step: usize, micro: usize) -> Result<Tensor> {
        self.deltas.set_training(true);
        let idx = self.order.indices(step, micro);
        let ex: Vec<&Example> = idx.iter().map(|&i| &self.train[i]).collect();
        let (logits, y) = self.logits(&ex)?;
        Ok(crate::ops::cross_entropy(&logits, &y, -100)?)
    }

    fn evaluate(&mut self) -> Result<f64> {
        let (p, g) = self.predict(32)?;
        Ok(crate::eval::classification::accuracy(&p, &g))
    }
}
