//! Objectives for the single-task path:
//! - a decoder on language modelling or prompt -> completion (perplexity, ROUGE of generations);
//! - sequence classification with an encoder (linear head on mean-pooled states) or a decoder
//!   (linear head on the last non-pad token, or label verbalizers scored by the LM);
//! - token classification with an encoder (per-token linear head, entity-level F1).
//!
//! Batch order ([`BatchOrder`]) is a pure function of seed and step, so resumed runs replay
//! exactly. Every objective also reports its full metric set through [`Evaluate`].

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var, D};
use rand::{rngs::StdRng, SeedableRng};
use serde::Serialize;

use super::trainer::Objective;
pub use crate::data::batch::BatchOrder;
use crate::data::batch::{collate, pad_ids, ClsItem, Sequence, TagItem, IGNORE};
use crate::data::{Content, Example};
use crate::eval::perplexity::Perplexity;
use crate::model::{Bert, Llama, TextTokenizer};
use crate::params::ParamStore;
use crate::peft::DeltaSet;
use crate::{Error, Result};

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
        let h = self.model.forward_hidden(
            self.base,
            self.deltas,
            self.params,
            &b.input_ids,
            Some(&b.attention_mask),
            None,
        )?;
        Ok((
            self.model.lm_head_loss(self.base, &h, &b.targets, -100)?,
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

/// An objective's full metric set; `primary` names the one early stopping and the report's
/// before/after use.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Metrics {
    pub primary: &'static str,
    pub higher_is_better: bool,
    pub values: BTreeMap<String, f64>,
}

impl Metrics {
    fn new(primary: &'static str, higher_is_better: bool, values: &[(&str, f64)]) -> Self {
        Self {
            primary,
            higher_is_better,
            values: values.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        }
    }

    pub fn value(&self) -> f64 {
        self.values.get(self.primary).copied().unwrap_or(f64::NAN)
    }
}

/// Evaluation on the objective's held-out examples.
pub trait Evaluate {
    fn metrics(&mut self) -> Result<Metrics>;
}

impl Evaluate for DecoderLm<'_> {
    fn metrics(&mut self) -> Result<Metrics> {
        let p = self.perplexity(8)?;
        Ok(Metrics::new(
            "perplexity",
            false,
            &[
                ("perplexity", p.value()),
                ("nll", p.nll()),
                ("eval_tokens", p.tokens as f64),
            ],
        ))
    }
}

/// An objective whose evaluation (for early stopping) is one chosen metric of its set.
pub struct Monitored<'o, O> {
    pub inner: &'o mut O,
    pub metric: String,
}

/// Whether smaller values of `metric` are better.
pub fn lower_is_better(metric: &str) -> bool {
    matches!(metric, "perplexity" | "nll")
}

impl<O: Objective + Evaluate> Objective for Monitored<'_, O> {
    fn loss(&mut self, step: usize, micro: usize) -> Result<Tensor> {
        self.inner.loss(step, micro)
    }

    fn evaluate(&mut self) -> Result<f64> {
        let m = self.inner.metrics()?;
        m.values.get(&self.metric).copied().ok_or_else(|| {
            Error::invalid(format!(
                "metric `{}` is not reported here (available: {})",
                self.metric,
                m.values.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })
    }

    fn tokens(&self, step: usize, micro: usize) -> usize {
        self.inner.tokens(step, micro)
    }
}

fn class_metrics(pred: &[usize], gold: &[usize]) -> Metrics {
    use crate::eval::classification::{accuracy, macro_f1};
    Metrics::new(
        "accuracy",
        true,
        &[
            ("accuracy", accuracy(pred, gold)),
            ("macro_f1", macro_f1(pred, gold)),
        ],
    )
}

fn argmax_rows(logits: &Tensor) -> Result<Vec<usize>> {
    Ok(logits
        .detach()
        .argmax(D::Minus1)?
        .flatten_all()?
        .to_vec1::<u32>()?
        .into_iter()
        .map(|x| x as usize)
        .collect())
}

pub fn label_tensor(items: &[&ClsItem]) -> Result<Tensor> {
    let y: Vec<u32> = items.iter().map(|i| i.label as u32).collect();
    Ok(Tensor::from_vec(y, items.len(), &Device::Cpu)?)
}

/// Predictions and gold labels of a classifier over `eval`, `batch` items at a time.
fn predict_items(
    eval: &[ClsItem],
    batch: usize,
    logits: impl Fn(&[&ClsItem]) -> Result<Tensor>,
) -> Result<(Vec<usize>, Vec<usize>)> {
    let (mut pred, mut gold) = (vec![], vec![]);
    for chunk in eval.chunks(batch.max(1)) {
        let refs: Vec<&ClsItem> = chunk.iter().collect();
        pred.extend(argmax_rows(&logits(&refs)?)?);
        gold.extend(chunk.iter().map(|i| i.label));
    }
    Ok((pred, gold))
}

/// Logits `[b, labels]` of a linear head (`classifier.*` in `head`) on an encoder's
/// mask-averaged token states.
pub fn pooled_logits(
    model: &Bert,
    base: &ParamStore,
    deltas: &DeltaSet,
    params: &ParamStore,
    head: &ParamStore,
    items: &[&ClsItem],
    pad: u32,
) -> Result<Tensor> {
    let seqs: Vec<&[u32]> = items.iter().map(|i| i.ids.as_slice()).collect();
    let (ids, mask, _) = pad_ids(&seqs, pad)?;
    let states = model.forward(base, deltas, params, &ids, None, &mask)?;
    let m = mask.to_dtype(states.dtype())?.unsqueeze(2)?;
    let pooled = states
        .broadcast_mul(&m)?
        .sum(1)?
        .broadcast_div(&m.sum(1)?.clamp(1.0, f64::INFINITY)?)?;
    Ok(crate::ops::linear(
        &pooled,
        head.get(HEAD_W)?,
        Some(head.get(HEAD_B)?),
    )?)
}

/// Per-token logits `[b, t, tags]` of a linear head (`classifier.*` in `head`) on an encoder's
/// token states, and the padded targets `[b, t]` (`IGNORE` past each item's end).
pub fn token_logits(
    model: &Bert,
    base: &ParamStore,
    deltas: &DeltaSet,
    params: &ParamStore,
    head: &ParamStore,
    items: &[&TagItem],
    pad: u32,
) -> Result<(Tensor, Tensor)> {
    let seqs: Vec<&[u32]> = items.iter().map(|i| i.ids.as_slice()).collect();
    let (ids, mask, _) = pad_ids(&seqs, pad)?;
    let t = ids.dim(1)?;
    let tg: Vec<i64> = items
        .iter()
        .flat_map(|i| {
            i.targets
                .iter()
                .copied()
                .chain(std::iter::repeat(IGNORE))
                .take(t)
        })
        .collect();
    let targets = Tensor::from_vec(tg, (items.len(), t), &Device::Cpu)?;
    let states = model.forward(base, deltas, params, &ids, None, &mask)?;
    let logits = crate::ops::linear(&states, head.get(HEAD_W)?, Some(head.get(HEAD_B)?))?;
    Ok((logits, targets))
}

/// An encoder with a linear head on mean-pooled token states.
pub struct EncoderClassifier<'a> {
    pub model: &'a Bert,
    pub base: &'a ParamStore,
    pub deltas: &'a DeltaSet,
    pub params: &'a ParamStore,
    pub head: &'a ParamStore,
    pub train: Vec<ClsItem>,
    pub eval: Vec<ClsItem>,
    pub order: BatchOrder,
    pub pad: u32,
}

impl EncoderClassifier<'_> {
    /// Logits `[b, labels]`.
    pub fn logits(&self, items: &[&ClsItem]) -> Result<Tensor> {
        pooled_logits(
            self.model,
            self.base,
            self.deltas,
            self.params,
            self.head,
            items,
            self.pad,
        )
    }

    /// Predicted and gold label indices for the evaluation items.
    pub fn predict(&self, batch: usize) -> Result<(Vec<usize>, Vec<usize>)> {
        self.deltas.set_training(false);
        predict_items(&self.eval, batch, |b| self.logits(b))
    }
}

impl Objective for EncoderClassifier<'_> {
    fn loss(&mut self, step: usize, micro: usize) -> Result<Tensor> {
        self.deltas.set_training(true);
        let idx = self.order.indices(step, micro);
        let items: Vec<&ClsItem> = idx.iter().map(|&i| &self.train[i]).collect();
        let logits = self.logits(&items)?;
        Ok(crate::ops::cross_entropy(
            &logits,
            &label_tensor(&items)?,
            -100,
        )?)
    }

    fn evaluate(&mut self) -> Result<f64> {
        Ok(self.metrics()?.value())
    }
}

impl Evaluate for EncoderClassifier<'_> {
    fn metrics(&mut self) -> Result<Metrics> {
        let (p, g) = self.predict(32)?;
        Ok(class_metrics(&p, &g))
    }
}

/// How a decoder turns a prompt into label scores.
pub enum DecoderHead<'a> {
    /// A linear head (`classifier.weight/bias`) on the hidden state of the last non-pad token.
    Linear(&'a ParamStore),
    /// One token sequence per label (its verbalizer, e.g. ` positive`); a label's score is the
    /// LM's summed log-probability of its tokens after the prompt.
    Verbalizer(Vec<Vec<u32>>),
}

/// Sequence classification with a decoder. Training minimises cross-entropy over the label
/// scores (for verbalizers: a softmax over the labels' summed log-probabilities, so the gold
/// label is pushed up *relative to the other labels*, not only its own likelihood).
pub struct DecoderClassifier<'a> {
    pub model: &'a Llama,
    pub base: &'a ParamStore,
    pub deltas: &'a DeltaSet,
    pub params: &'a ParamStore,
    pub head: DecoderHead<'a>,
    /// Prompt ids (from [`crate::data::batch::decoder_items`]) and label indices.
    pub train: Vec<ClsItem>,
    pub eval: Vec<ClsItem>,
    pub order: BatchOrder,
    pub pad: u32,
}

impl DecoderClassifier<'_> {
    /// Label scores `[b, labels]`: logits of the linear head, or verbalizer log-probabilities.
    pub fn scores(&self, items: &[&ClsItem]) -> Result<Tensor> {
        match &self.head {
            DecoderHead::Linear(head) => {
                let seqs: Vec<&[u32]> = items.iter().map(|i| i.ids.as_slice()).collect();
                let (ids, mask, lens) = pad_ids(&seqs, self.pad)?;
                let h = self.model.forward_hidden(
                    self.base,
                    self.deltas,
                    self.params,
                    &ids,
                    Some(&mask),
                    None,
                )?;
                let (b, t, d) = h.dims3()?;
                let rows: Vec<u32> = lens
                    .iter()
                    .enumerate()
                    .map(|(i, &l)| (i * t + l.max(1) - 1) as u32)
                    .collect();
                let last = h
                    .reshape((b * t, d))?
                    .index_select(&Tensor::from_vec(rows, b, &Device::Cpu)?, 0)?;
                Ok(crate::ops::linear(
                    &last,
                    head.get(HEAD_W)?,
                    Some(head.get(HEAD_B)?),
                )?)
            }
            DecoderHead::Verbalizer(verbs) => {
                let prompts: Vec<&[u32]> = items.iter().map(|i| i.ids.as_slice()).collect();
                verbalizer_scores(
                    self.model,
                    self.base,
                    self.deltas,
                    self.params,
                    &prompts,
                    verbs,
                    self.pad,
                )
            }
        }
    }

    pub fn predict(&self, batch: usize) -> Result<(Vec<usize>, Vec<usize>)> {
        self.deltas.set_training(false);
        predict_items(&self.eval, batch, |b| self.scores(b))
    }
}

/// Summed log-probabilities `[prompts, labels]` of each label's tokens `verbs[j]` following each
/// prompt, from one padded forward pass over every (prompt, label) pair. Differentiable.
pub fn verbalizer_scores(
    model: &Llama,
    base: &ParamStore,
    deltas: &DeltaSet,
    params: &ParamStore,
    prompts: &[&[u32]],
    verbs: &[Vec<u32>],
    pad: u32,
) -> Result<Tensor> {
    if verbs.iter().any(Vec::is_empty) {
        return Err(Error::invalid("a label verbalizer tokenizes to nothing"));
    }
    let seqs: Vec<Vec<u32>> = prompts
        .iter()
        .flat_map(|p| {
            verbs
                .iter()
                .map(move |v| p.iter().chain(v).copied().collect())
        })
        .collect();
    let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
    let (ids, mask, _) = pad_ids(&refs, pad)?;
    let h = model.forward_hidden(base, deltas, params, &ids, Some(&mask), None)?;
    let (n, t, d) = h.dims3()?;
    // The hidden state before each label token predicts it.
    let (mut rows, mut targets, mut owner) = (vec![], vec![], vec![]);
    for (s, p) in prompts.iter().enumerate() {
        for (j, v) in verbs.iter().enumerate() {
            let seq = s * verbs.len() + j;
            for (k, &tok) in v.iter().enumerate() {
                let pos = p.len() + k;
                if pos == 0 {
                    return Err(Error::invalid(
                        "decoder classification needs a non-empty prompt",
                    ));
                }
                rows.push((seq * t + pos - 1) as u32);
                targets.push(tok);
                owner.push(seq);
            }
        }
    }
    let k = rows.len();
    let dev = Device::Cpu;
    let hs = h
        .reshape((n * t, d))?
        .index_select(&Tensor::from_vec(rows, k, &dev)?, 0)?;
    let logits = model.lm_head(base, &hs)?;
    let m = logits.max_keepdim(1)?.detach();
    let lse = (logits.broadcast_sub(&m)?.exp()?.sum_keepdim(1)?.log()? + m)?;
    let tgt = Tensor::from_vec(targets, (k, 1), &dev)?;
    let lp = (logits.gather(&tgt, 1)? - lse)?; // [k, 1]
    let mut seg = vec![0f32; n * k];
    for (row, &o) in owner.iter().enumerate() {
        seg[o * k + row] = 1.0;
    }
    let seg = Tensor::from_vec(seg, (n, k), &dev)?.to_dtype(lp.dtype())?;
    Ok(seg.matmul(&lp)?.reshape((prompts.len(), verbs.len()))?)
}

impl Objective for DecoderClassifier<'_> {
    fn loss(&mut self, step: usize, micro: usize) -> Result<Tensor> {
        self.deltas.set_training(true);
        let idx = self.order.indices(step, micro);
        let items: Vec<&ClsItem> = idx.iter().map(|&i| &self.train[i]).collect();
        let scores = self.scores(&items)?;
        Ok(crate::ops::cross_entropy(
            &scores,
            &label_tensor(&items)?,
            -100,
        )?)
    }

    fn evaluate(&mut self) -> Result<f64> {
        Ok(self.metrics()?.value())
    }
}

impl Evaluate for DecoderClassifier<'_> {
    fn metrics(&mut self) -> Result<Metrics> {
        let (p, g) = self.predict(8)?;
        Ok(class_metrics(&p, &g))
    }
}

/// One tag per word.
pub type TagSeq = Vec<String>;

/// Token classification (BIO tagging): an encoder with a linear head on every token; the loss
/// is on the first sub-token of each word; predictions are read there too.
pub struct EncoderTagger<'a> {
    pub model: &'a Bert,
    pub base: &'a ParamStore,
    pub deltas: &'a DeltaSet,
    pub params: &'a ParamStore,
    pub head: &'a ParamStore,
    pub tags: Vec<String>,
    pub train: Vec<TagItem>,
    pub eval: Vec<TagItem>,
    pub order: BatchOrder,
    pub pad: u32,
}

impl EncoderTagger<'_> {
    /// Per-token logits `[b, t, tags]` and padded targets `[b, t]`.
    pub fn logits(&self, items: &[&TagItem]) -> Result<(Tensor, Tensor)> {
        token_logits(
            self.model,
            self.base,
            self.deltas,
            self.params,
            self.head,
            items,
            self.pad,
        )
    }

    /// Predicted and gold tag sequences (one tag per word) for the evaluation items. Words
    /// lost to truncation are predicted `O`.
    pub fn predict(&self, batch: usize) -> Result<(Vec<TagSeq>, Vec<TagSeq>)> {
        self.deltas.set_training(false);
        let (mut pred, mut gold) = (vec![], vec![]);
        for chunk in self.eval.chunks(batch.max(1)) {
            let refs: Vec<&TagItem> = chunk.iter().collect();
            let (logits, _) = self.logits(&refs)?;
            let best = logits.detach().argmax(D::Minus1)?.to_vec2::<u32>()?;
            for (item, row) in chunk.iter().zip(best) {
                let mut p = vec!["O".to_string(); item.gold.len()];
                let mut prev = None;
                for (tok, w) in item.word_of.iter().enumerate() {
                    if let Some(w) = w {
                        if prev != Some(*w) && *w < p.len() {
                            p[*w] = self.tags[row[tok] as usize].clone();
                        }
                    }
                    prev = *w;
                }
                pred.push(p);
                gold.push(item.gold.clone());
            }
        }
        Ok((pred, gold))
    }
}

impl Objective for EncoderTagger<'_> {
    fn loss(&mut self, step: usize, micro: usize) -> Result<Tensor> {
        self.deltas.set_training(true);
        let idx = self.order.indices(step, micro);
        let items: Vec<&TagItem> = idx.iter().map(|&i| &self.train[i]).collect();
        let (logits, targets) = self.logits(&items)?;
        Ok(crate::ops::cross_entropy(&logits, &targets, IGNORE)?)
    }

    fn evaluate(&mut self) -> Result<f64> {
        Ok(self.metrics()?.value())
    }
}

impl Evaluate for EncoderTagger<'_> {
    fn metrics(&mut self) -> Result<Metrics> {
        use crate::eval::seqeval;
        let (p, g) = self.predict(16)?;
        let prf = seqeval::prf(&p, &g);
        Ok(Metrics::new(
            "f1",
            true,
            &[
                ("f1", prf.f1),
                ("precision", prf.precision),
                ("recall", prf.recall),
                ("token_accuracy", seqeval::token_accuracy(&p, &g)),
            ],
        ))
    }
}

/// What a saved head sits on.
pub const HEAD_ENCODER_POOLED: &str = "encoder_mean_pooled_linear";
pub const HEAD_DECODER_LAST: &str = "decoder_last_token_linear";
pub const HEAD_TOKEN: &str = "token_linear";

/// Write `head.safetensors`, `labels.json` and `head.json` (`{kind, labels}`) into `dir`.
pub fn save_head(head: &ParamStore, labels: &[String], kind: &str, dir: &Path) -> Result<()> {
    let tensors: HashMap<String, Tensor> = head
        .iter()
        .map(|(n, p)| (n.to_string(), p.tensor().detach()))
        .collect();
    crate::io::save_safetensors(&tensors, &dir.join("head.safetensors"))?;
    let json = |v: &serde_json::Value| serde_json::to_string_pretty(v).map_err(Error::invalid);
    crate::io::write_atomic(
        &dir.join("labels.json"),
        json(&serde_json::json!(labels))?.as_bytes(),
    )?;
    crate::io::write_atomic(
        &dir.join("head.json"),
        json(&serde_json::json!({"kind": kind, "labels": labels}))?.as_bytes(),
    )
}

/// Read a head saved by [`save_head`] for a model with `hidden` units, checking that it is of
/// `kind` and that its labels are exactly `labels` (the task's). Mismatches name the labels.
pub fn load_head(dir: &Path, kind: &str, labels: &[String], hidden: usize) -> Result<ParamStore> {
    let lp = dir.join("labels.json");
    let text = std::fs::read_to_string(&lp).map_err(|e| {
        Error::file(
            &lp,
            format!(
                "cannot read the head's labels ({e}); --head wants the directory of an `adapt` run"
            ),
        )
    })?;
    let saved: Vec<String> = serde_json::from_str(&text).map_err(|e| Error::file(&lp, e))?;
    if let Ok(t) = std::fs::read_to_string(dir.join("head.json")) {
        let v: serde_json::Value =
            serde_json::from_str(&t).map_err(|e| Error::file(dir.join("head.json"), e))?;
        if let Some(k) = v.get("kind").and_then(|k| k.as_str()) {
            if k != kind {
                return Err(Error::file(
                    dir.join("head.json"),
                    format!(
                        "the saved head is a `{k}` head; this model and task need a `{kind}` head"
                    ),
                ));
            }
        }
    }
    let missing: Vec<&str> = labels
        .iter()
        .filter(|l| !saved.contains(l))
        .map(String::as_str)
        .collect();
    let extra: Vec<&str> = saved
        .iter()
        .filter(|l| !labels.contains(l))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() || !extra.is_empty() {
        let show = |v: &[&str]| {
            if v.is_empty() {
                "none".to_string()
            } else if v.len() > 12 {
                format!("{} ... ({} in all)", v[..12].join(", "), v.len())
            } else {
                v.join(", ")
            }
        };
        return Err(Error::file(
            &lp,
            format!(
                "the saved head's label set does not match the task: task labels missing from the head: {}; \
                 head labels not in the task: {}",
                show(&missing),
                show(&extra)
            ),
        ));
    }
    let mut head = ParamStore::new();
    let tensors = crate::io::load_safetensors(&dir.join("head.safetensors"))?;
    let mut by_name: HashMap<String, Tensor> = tensors.into_iter().collect();
    for (name, shape) in [
        (HEAD_W, vec![saved.len(), hidden]),
        (HEAD_B, vec![saved.len()]),
    ] {
        let t = by_name.remove(name).ok_or_else(|| {
            Error::file(
                dir.join("head.safetensors"),
                format!("missing tensor `{name}`"),
            )
        })?;
        if t.dims() != shape.as_slice() {
            return Err(Error::file(
                dir.join("head.safetensors"),
                format!("`{name}` has shape {:?}, expected {shape:?}", t.dims()),
            ));
        }
        head.insert_frozen(name, t.to_dtype(DType::F32)?);
    }
    // Rows follow the saved order; reorder them to the task's.
    let order: Vec<u32> = labels
        .iter()
        .map(|l| saved.iter().position(|s| s == l).unwrap_or(0) as u32)
        .collect();
    let idx = Tensor::from_vec(order, labels.len(), &Device::Cpu)?;
    let mut out = ParamStore::new();
    for name in [HEAD_W, HEAD_B] {
        out.insert_frozen(name, head.get(name)?.index_select(&idx, 0)?);
    }
    Ok(out)
}

/// Mean over examples of the best-reference ROUGE-1/2/L F1 of greedy generations for the first
/// `n` prompt -> completion examples; the generations are written to `log` (JSONL).
#[allow(clippy::too_many_arguments)]
pub fn rouge_eval(
    m: &Llama,
    tok: &TextTokenizer,
    base: &ParamStore,
    deltas: &DeltaSet,
    dp: &ParamStore,
    examples: &[Example],
    n: usize,
    max_new: usize,
    log: Option<&Path>,
) -> Result<[f64; 3]> {
    use crate::eval::rouge;
    use crate::generate::{generate, GenerateOptions};
    let mut sums = [0.0; 3];
    let mut lines = String::new();
    let take: Vec<&Example> = examples.iter().take(n).collect();
    deltas.set_training(false);
    for e in &take {
        let Content::PromptCompletion {
            prompt, references, ..
        } = &e.content
        else {
            continue;
        };
        let mut ids = tok.encode(prompt, false)?;
        let keep = 768usize;
        if ids.len() > keep {
            ids.drain(..ids.len() - keep);
        }
        // No stop string: models often start with a newline after "Summary:"; keep the first
        // non-empty line instead.
        let opts = GenerateOptions {
            max_new_tokens: max_new,
            ..Default::default()
        };
        let g = generate(m, base, deltas, dp, tok, &ids, &opts, |_| {})?;
        let text = g
            .text
            .trim_start()
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_string();
        let best = |f: &dyn Fn(&rouge::Rouge) -> f64| -> f64 {
            references
                .iter()
                .map(|r| f(&rouge::rouge(r, &text)))
                .fold(0.0, f64::max)
        };
        sums[0] += best(&|s| s.rouge1.fmeasure);
        sums[1] += best(&|s| s.rouge2.fmeasure);
        sums[2] += best(&|s| s.rouge_l.fmeasure);
        lines.push_str(
            &serde_json::json!({"generated": text, "references": references}).to_string(),
        );
        lines.push('\n');
    }
    if let (Some(log), false) = (log, take.is_empty()) {
        crate::io::write_atomic(log, lines.as_bytes())?;
    }
    let k = take.len().max(1) as f64;
    Ok([sums[0] / k, sums[1] / k, sums[2] / k])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testing::tiny_llama;
    use crate::ops::gradcheck;

    fn log_softmax_row(row: &[f64]) -> Vec<f64> {
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = row.iter().map(|x| (x - m).exp()).sum::<f64>().ln() + m;
        row.iter().map(|x| x - lse).collect()
    }

    #[test]
    fn verbalizer_scores_are_summed_label_log_probs_and_differentiable() -> Result<()> {
        let (m, p) = tiny_llama(3, DType::F64)?;
        let prompts: Vec<Vec<u32>> = vec![vec![5, 9, 2, 7], vec![11, 3], vec![4, 4, 8]];
        let verbs = vec![vec![6], vec![12, 13]];
        let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
        let none = (DeltaSet::none(), ParamStore::new());
        let s = verbalizer_scores(&m, &p, &none.0, &none.1, &refs, &verbs, 0)?;
        assert_eq!(s.dims(), &[3, 2]);
        let got = s.to_vec2::<f64>()?;
        // Reference: each (prompt, label) alone, unpadded, log-softmax by hand.
        for (i, pr) in prompts.iter().enumerate() {
            for (j, v) in verbs.iter().enumerate() {
                let seq: Vec<u32> = pr.iter().chain(v).copied().collect();
                let ids = Tensor::from_vec(seq.clone(), (1, seq.len()), &Device::Cpu)?;
                let logits = m.forward(&p, &none.0, &none.1, &ids, None)?.squeeze(0)?;
                let rows = logits.to_vec2::<f64>()?;
                let want: f64 = v
                    .iter()
                    .enumerate()
                    .map(|(k, &tok)| log_softmax_row(&rows[pr.len() + k - 1])[tok as usize])
                    .sum();
                assert!(
                    (got[i][j] - want).abs() < 1e-9,
                    "prompt {i} label {j}: {} vs {want}",
                    got[i][j]
                );
            }
        }
        // Gradients through the gather / log-sum-exp / segment sums match finite differences.
        let norm = p.get("model.norm.weight")?.clone();
        let err = gradcheck::check(
            |xs| {
                let mut q = p.clone();
                q.insert_frozen("model.norm.weight", xs[0].clone());
                verbalizer_scores(&m, &q, &none.0, &none.1, &refs, &verbs, 0)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))
            },
            &[norm],
            1e-5,
        )?;
        assert!(err < 1e-6, "verbalizer gradient error {err}");
        Ok(())
    }

    #[test]
    fn last_token_head_reads_the_last_real_token_of_padded_rows() -> Result<()> {
        let (m, p) = tiny_llama(4, DType::F64)?;
        let hidden = m.cfg.hidden_size;
        let w = crate::ops::gradcheck::randn_f64(&[3, hidden], 9, 0.5)?;
        let b = crate::ops::gradcheck::randn_f64(&[3], 10, 0.5)?;
        let mut head = ParamStore::new();
        head.insert_frozen(HEAD_W, w.clone());
        head.insert_frozen(HEAD_B, b.clone());
        let none = (DeltaSet::none(), ParamStore::new());
        let items = vec![
            ClsItem {
                ids: vec![3, 5, 7, 9, 2],
                label: 0,
            },
            ClsItem {
                ids: vec![8, 1],
                label: 2,
            },
        ];
        let clf = DecoderClassifier {
            model: &m,
            base: &p,
            deltas: &none.0,
            params: &none.1,
            head: DecoderHead::Linear(&head),
            train: vec![],
            eval: items.clone(),
            order: BatchOrder::new(0, 1, 1, 0),
            pad: 0,
        };
        let both = clf.scores(&[&items[0], &items[1]])?.to_vec2::<f64>()?;
        for (k, it) in items.iter().enumerate() {
            let alone = clf.scores(&[it])?.to_vec2::<f64>()?;
            for j in 0..3 {
                assert!(
                    (both[k][j] - alone[0][j]).abs() < 1e-9,
                    "row {k}: padding leaked"
                );
            }
        }
        // The head's gradient matches finite differences.
        let err = gradcheck::check(
            |xs| {
                let mut h = ParamStore::new();
                h.insert_frozen(HEAD_W, xs[0].clone());
                h.insert_frozen(HEAD_B, xs[1].clone());
                let c = DecoderClassifier {
                    model: &m,
                    base: &p,
                    deltas: &none.0,
                    params: &none.1,
                    head: DecoderHead::Linear(&h),
                    train: vec![],
                    eval: vec![],
                    order: BatchOrder::new(0, 1, 1, 0),
                    pad: 0,
                };
                c.scores(&[&items[0], &items[1]])
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))
            },
            &[w, b],
            1e-5,
        )?;
        assert!(err < 1e-6, "head gradient error {err}");
        Ok(())
    }

    #[test]
    fn saved_heads_check_and_reorder_labels() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("metapeft-head-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let labels: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let h = new_head(3, 4, 1)?;
        save_head(&h, &labels, HEAD_TOKEN, &dir)?;
        // Same set in another order: rows follow the labels.
        let shuffled: Vec<String> = ["c", "a", "b"].iter().map(|s| s.to_string()).collect();
        let got = load_head(&dir, HEAD_TOKEN, &shuffled, 4)?;
        let w = h.get(HEAD_W)?.to_vec2::<f32>()?;
        assert_eq!(
            got.get(HEAD_W)?.to_vec2::<f32>()?,
            vec![w[2].clone(), w[0].clone(), w[1].clone()]
        );
        // Another label set: both differences are named.
        let other: Vec<String> = ["a", "b", "d"].iter().map(|s| s.to_string()).collect();
        let e = load_head(&dir, HEAD_TOKEN, &other, 4)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("missing from the head: d") && e.contains("not in the task: c"),
            "{e}"
        );
        // Another head kind or hidden size is refused.
        let e = load_head(&dir, HEAD_ENCODER_POOLED, &labels, 4)
            .unwrap_err()
            .to_string();
        assert!(e.contains("token_linear"), "{e}");
        let e = load_head(&dir, HEAD_TOKEN, &labels, 5)
            .unwrap_err()
            .to_string();
        assert!(e.contains("shape"), "{e}");
        Ok(())
    }
}
