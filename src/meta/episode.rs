//! Episode losses for the model kinds: a decoder on language modelling or prompt -> completion,
//! an encoder on N-way classification or on token classification (tagging).

use candle_core::Tensor;

use super::maml::EpisodeLoss;
use crate::data::batch::{collate, ClsItem, Sequence, TagItem, IGNORE};
use crate::model::{Bert, Llama};
use crate::params::ParamStore;
use crate::peft::DeltaSet;
use crate::train::objectives::{label_tensor, pooled_logits, token_logits};
use crate::Result;

/// A decoder's episode: next-token cross-entropy on support batches (inner step `k` takes the
/// `k`-th batch, cycling) and on the whole query set.
pub struct LmEpisode<'a> {
    pub model: &'a Llama,
    pub deltas: &'a DeltaSet,
    pub support: Vec<Sequence>,
    pub query: Vec<Sequence>,
    /// Support sequences per inner step.
    pub batch: usize,
    pub pad: u32,
}

impl LmEpisode<'_> {
    /// The support set, or the query set when there is no support (no inner loop): what a
    /// task embedding is computed from.
    pub fn support_or_query(&self) -> Vec<Sequence> {
        if self.support.is_empty() {
            self.query.clone()
        } else {
            self.support.clone()
        }
    }

    fn loss(&self, base: &ParamStore, fast: &ParamStore, seqs: &[&Sequence]) -> Result<Tensor> {
        let b = collate(seqs, self.pad)?;
        let h = self.model.forward_hidden(
            base,
            self.deltas,
            fast,
            &b.input_ids,
            Some(&b.attention_mask),
            None,
        )?;
        self.model.lm_head_loss(base, &h, &b.targets, -100)
    }
}

impl EpisodeLoss for LmEpisode<'_> {
    fn support(&self, base: &ParamStore, fast: &ParamStore, step: usize) -> Result<Tensor> {
        let n = self.support.len().max(1);
        let b = self.batch.clamp(1, n);
        let seqs: Vec<&Sequence> = (0..b).map(|i| &self.support[(step * b + i) % n]).collect();
        self.loss(base, fast, &seqs)
    }

    fn query(&self, base: &ParamStore, fast: &ParamStore) -> Result<Tensor> {
        let seqs: Vec<&Sequence> = self.query.iter().collect();
        self.loss(base, fast, &seqs)
    }
}

/// An encoder's episode: N-way classification with a linear head on mean-pooled states, the
/// head (`classifier.*`) living in the fast store with the delta, so the inner loop adapts both.
pub struct ClsEpisode<'a> {
    pub model: &'a Bert,
    pub deltas: &'a DeltaSet,
    pub support: Vec<ClsItem>,
    pub query: Vec<ClsItem>,
    /// Support items per inner step.
    pub batch: usize,
    pub pad: u32,
}

impl ClsEpisode<'_> {
    fn loss(&self, base: &ParamStore, fast: &ParamStore, items: &[&ClsItem]) -> Result<Tensor> {
        let logits = pooled_logits(self.model, base, self.deltas, fast, fast, items, self.pad)?;
        Ok(crate::ops::cross_entropy(
            &logits,
            &label_tensor(items)?,
            -100,
        )?)
    }
}

impl EpisodeLoss for ClsEpisode<'_> {
    fn support(&self, base: &ParamStore, fast: &ParamStore, step: usize) -> Result<Tensor> {
        let n = self.support.len().max(1);
        let b = self.batch.clamp(1, n);
        let items: Vec<&ClsItem> = (0..b).map(|i| &self.support[(step * b + i) % n]).collect();
        self.loss(base, fast, &items)
    }

    fn query(&self, base: &ParamStore, fast: &ParamStore) -> Result<Tensor> {
        let items: Vec<&ClsItem> = self.query.iter().collect();
        self.loss(base, fast, &items)
    }
}

/// An encoder's tagging episode: token cross-entropy on each word's first sub-token, with the
/// per-token head (`classifier.*`) in the fast store: unlike N-way episodes, the tag set is the
/// same in every task, so the head's initial values are meta-learned with the delta's.
pub struct TagEpisode<'a> {
    pub model: &'a Bert,
    pub deltas: &'a DeltaSet,
    pub support: Vec<TagItem>,
    pub query: Vec<TagItem>,
    /// Support items per inner step.
    pub batch: usize,
    pub pad: u32,
}

impl TagEpisode<'_> {
    fn loss(&self, base: &ParamStore, fast: &ParamStore, items: &[&TagItem]) -> Result<Tensor> {
        let (logits, targets) =
            token_logits(self.model, base, self.deltas, fast, fast, items, self.pad)?;
        Ok(crate::ops::cross_entropy(&logits, &targets, IGNORE)?)
    }
}

impl EpisodeLoss for TagEpisode<'_> {
    fn support(&self, base: &ParamStore, fast: &ParamStore, step: usize) -> Result<Tensor> {
        let n = self.support.len().max(1);
        let b = self.batch.clamp(1, n);
        let items: Vec<&TagItem> = (0..b).map(|i| &self.support[(step * b + i) % n]).collect();
        self.loss(base, fast, &items)
    }

    fn query(&self, base: &ParamStore, fast: &ParamStore) -> Result<Tensor> {
        let items: Vec<&TagItem> = self.query.iter().collect();
        self.loss(base, fast, &items)
    }
}
