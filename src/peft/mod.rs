//! Deltas: the trainable "difference" attached to a frozen base.
//!
//! A model calls its [`DeltaSet`] at every site where a delta may act:
//! - a base tensor being read (norm weights, biases): [`Delta::weight`];
//! - the input and output of each linear layer, named like Hugging Face modules
//!   (`model.layers.3.self_attn.q_proj`): [`Delta::linear_input`], [`Delta::linear`];
//! - the keys/values of each attention block (prefix tuning): [`Delta::attention_prefix`];
//! - the input embeddings (prompt tuning): [`Delta::input_embeddings`];
//! - the attention and FFN sublayer outputs (adapters): [`Delta::after_attention`],
//!   [`Delta::after_ffn`].
//!
//! Each delta reads its parameters from its own [`ParamStore`] (names follow PEFT without the
//! `base_model.model.` prefix), so the base store is never touched and inner-loop fast weights are
//! just another store.

pub mod adapter;
pub mod bitfit;
pub mod config;
pub mod ia3;
pub mod ln_tuning;
pub mod lora;
pub mod prefix;
pub mod prompt;
pub mod targets;
pub mod tarp;
#[cfg(test)]
mod tests;

use candle_core::Tensor;

pub use config::{Adapter, DeltaConfig};

use crate::params::ParamStore;
use crate::{Error, Result};

/// One delta method. Methods override the sites they act on; the defaults leave the base alone.
pub trait Delta: Send + Sync + std::fmt::Debug {
    /// A short method name (`lora`, `ia3`, ...), used in messages.
    fn method(&self) -> &'static str;

    /// A replacement for (or an addition of) base tensor `name`, e.g. a tuned norm weight or bias.
    fn weight(
        &self,
        _name: &str,
        _base: Option<&Tensor>,
        _params: &ParamStore,
    ) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Transform the input `x` of linear layer `module` (IA3 on feed-forward layers).
    fn linear_input(&self, _module: &str, x: Tensor, _params: &ParamStore) -> Result<Tensor> {
        Ok(x)
    }

    /// Adjust the output `y = x W^T (+ b)` of the linear layer `module` (`w` is its base weight;
    /// `None` when the base keeps it quantized).
    fn linear(
        &self,
        _module: &str,
        _x: &Tensor,
        _w: Option<&Tensor>,
        y: Tensor,
        _params: &ParamStore,
    ) -> Result<Tensor> {
        Ok(y)
    }

    /// The whole output of linear layer `module`, base product included, where this delta
    /// computes it in one op (LoRA: `x W^T + s (x A^T) B^T` without keeping `x W^T` for the
    /// backward); `None` leaves the base product to the model and the delta to
    /// [`Delta::linear`]. Only asked of the first delta of a set: a later one would skip the
    /// earlier ones' output hooks.
    fn fused_linear(
        &self,
        _module: &str,
        _x: &Tensor,
        _w: &Tensor,
        _bias: Option<&Tensor>,
        _params: &ParamStore,
    ) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Whether this delta leaves linear layer `module` alone: its input, weight, bias and output,
    /// and the sublayer output it produces (see [`Delta::after_attention`] and
    /// [`Delta::after_ffn`]). Lets the model fuse the linear with the residual add (and, for a
    /// feed-forward's down projection, the activation before it). A method that acts anywhere on
    /// linears must keep the conservative default.
    fn leaves_linear(&self, _module: &str) -> bool {
        false
    }

    /// The factors `(A: [r, in], B: [out, r], scale)` when this delta's whole effect on linear
    /// `module` (its input, weight, bias, output and sublayer output) is the weight change
    /// `scale * B A` (LoRA without dropout or trained biases there); `None` otherwise. Lets the
    /// model run a whole sublayer as one op.
    fn low_rank(&self, _module: &str, _params: &ParamStore) -> Result<Option<LowRank>> {
        Ok(None)
    }

    /// Number of key/value positions this delta prepends in every attention layer.
    fn prefix_len(&self) -> usize {
        0
    }

    /// Keys and values `[batch, kv_heads, prefix_len, head_dim]` prepended in attention `layer`.
    fn attention_prefix(
        &self,
        _layer: usize,
        _batch: usize,
        _params: &ParamStore,
    ) -> Result<Option<(Tensor, Tensor)>> {
        Ok(None)
    }

    /// Number of soft tokens this delta prepends to the input embeddings.
    fn virtual_tokens(&self) -> usize {
        0
    }

    /// Transform the input embeddings `[batch, t, d]` (prompt tuning prepends soft tokens).
    fn input_embeddings(&self, x: Tensor, _params: &ParamStore) -> Result<Tensor> {
        Ok(x)
    }

    /// Adjust the attention sublayer's output (before the residual add) in `layer`.
    fn after_attention(&self, _layer: usize, h: Tensor, _params: &ParamStore) -> Result<Tensor> {
        Ok(h)
    }

    /// Adjust the FFN sublayer's output `out` (before the residual add) given its input `x`.
    fn after_ffn(
        &self,
        _layer: usize,
        _x: &Tensor,
        out: Tensor,
        _params: &ParamStore,
    ) -> Result<Tensor> {
        Ok(out)
    }

    /// Whether [`Delta::merge`] can fold this delta into the base weights exactly.
    fn mergeable(&self) -> bool {
        false
    }

    /// Whether the delta mixes sequence positions outside attention (TAMS's convolutions). Then
    /// a position's output depends on earlier positions' hidden states, which a KV cache does not
    /// keep: decoding must recompute the whole sequence.
    fn mixes_positions(&self) -> bool {
        false
    }

    /// Training mode switches on stochastic parts such as LoRA dropout.
    fn set_training(&self, _on: bool) {}

    /// Whether the forward pass currently draws random numbers (dropout while training).
    fn is_stochastic(&self) -> bool {
        false
    }

    /// Fold the delta into `base` (a copy of the base store the caller owns).
    fn merge(&self, _base: &mut ParamStore, _params: &ParamStore) -> Result<()> {
        Err(Error::invalid(format!(
            "{} changes the computation, not the weights: it cannot be merged into the base model",
            self.method()
        )))
    }

    /// Undo [`Delta::merge`] on a merged store. Methods whose merge overwrites base values
    /// (BitFit, LN tuning) cannot: keep the original store instead (merging never mutates it).
    fn unmerge(&self, _merged: &mut ParamStore, _params: &ParamStore) -> Result<()> {
        Err(Error::invalid(format!(
            "{} overwrites base values when merged: keep the unmerged store instead",
            self.method()
        )))
    }
}

/// A linear's low-rank weight change `scale * B A`: `(A: [r, in], B: [out, r], scale)`.
pub type LowRank = (Tensor, Tensor, f64);

/// The deltas attached to a model, applied in order. Cloning shares the deltas (activation
/// checkpointing keeps a handle to re-run a layer in the backward pass).
#[derive(Debug, Default, Clone)]
pub struct DeltaSet {
    deltas: Vec<std::sync::Arc<dyn Delta>>,
}

impl DeltaSet {
    /// No delta: the plain base model.
    pub fn none() -> Self {
        Self::default()
    }

    pub fn push(&mut self, d: impl Delta + 'static) {
        self.deltas.push(std::sync::Arc::new(d));
    }

    pub fn push_boxed(&mut self, d: Box<dyn Delta>) {
        self.deltas.push(d.into());
    }

    /// Whether a forward pass draws random numbers (LoRA dropout in training mode), so that
    /// re-running it would not reproduce it.
    pub fn is_stochastic(&self) -> bool {
        self.deltas.iter().any(|d| d.is_stochastic())
    }

    pub fn is_empty(&self) -> bool {
        self.deltas.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &dyn Delta> {
        self.deltas.iter().map(|d| d.as_ref())
    }

    /// Training mode enables stochastic parts such as LoRA dropout (off by default).
    pub fn set_training(&self, on: bool) {
        self.deltas.iter().for_each(|d| d.set_training(on));
    }

    /// Base tensor `name` as the model should use it: the base store's, unless a delta replaces
    /// it (the last one wins). Errors if neither has it.
    pub fn resolve(&self, name: &str, base: &ParamStore, params: &ParamStore) -> Result<Tensor> {
        if self.deltas.is_empty() {
            return Ok(base.get(name)?.clone());
        }
        self.weight(name, base.get_opt(name), params)?
            .ok_or_else(|| Error::invalid(format!("parameter `{name}` is not in the store")))
    }

    /// The tensor to use for base tensor `name` (the last delta that replaces it wins).
    pub fn weight(
        &self,
        name: &str,
        base: Option<&Tensor>,
        params: &ParamStore,
    ) -> Result<Option<Tensor>> {
        let mut out = base.cloned();
        for d in &self.deltas {
            if let Some(t) = d.weight(name, out.as_ref(), params)? {
                out = Some(t);
            }
        }
        Ok(out)
    }

    pub fn linear_input(&self, module: &str, x: Tensor, params: &ParamStore) -> Result<Tensor> {
        self.deltas
            .iter()
            .try_fold(x, |x, d| d.linear_input(module, x, params))
    }

    pub fn linear(
        &self,
        module: &str,
        x: &Tensor,
        w: Option<&Tensor>,
        y: Tensor,
        params: &ParamStore,
    ) -> Result<Tensor> {
        self.deltas
            .iter()
            .try_fold(y, |y, d| d.linear(module, x, w, y, params))
    }

    /// The output of linear layer `module` (`x` already through [`DeltaSet::linear_input`]) when
    /// the first delta computes base product and its own change in one op, then passed through
    /// the other deltas' [`Delta::linear`]; `None` when the model computes the base product.
    pub fn fused_linear(
        &self,
        module: &str,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        params: &ParamStore,
    ) -> Result<Option<Tensor>> {
        let Some((first, rest)) = self.deltas.split_first() else {
            return Ok(None);
        };
        let Some(y) = first.fused_linear(module, x, w, bias, params)? else {
            return Ok(None);
        };
        rest.iter()
            .try_fold(y, |y, d| d.linear(module, x, Some(w), y, params))
            .map(Some)
    }

    /// For each of `modules`, the low-rank weight change the deltas make to it (`None`: left
    /// alone), when that is all they do to those linears and their sublayers: at most one delta
    /// per linear, each either leaving it alone or a plain low-rank change
    /// ([`Delta::low_rank`]). `None` when any delta does anything else there.
    pub fn low_rank_only(
        &self,
        modules: &[String],
        params: &ParamStore,
    ) -> Result<Option<Vec<Option<LowRank>>>> {
        let mut out = Vec::with_capacity(modules.len());
        for m in modules {
            let mut change = None;
            for d in &self.deltas {
                if d.leaves_linear(m) {
                    continue;
                }
                match d.low_rank(m, params)? {
                    Some(lr) if change.is_none() => change = Some(lr),
                    _ => return Ok(None),
                }
            }
            out.push(change);
        }
        Ok(Some(out))
    }

    /// Whether some delta replaces base tensor `name` ([`Delta::weight`]).
    pub fn replaces(&self, name: &str, base: &ParamStore, params: &ParamStore) -> Result<bool> {
        let base = base.get_opt(name);
        for d in &self.deltas {
            if d.weight(name, base, params)?.is_some() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Whether every delta leaves linear layer `module` alone ([`Delta::leaves_linear`]); true
    /// for an empty set.
    pub fn leaves_linear(&self, module: &str) -> bool {
        self.deltas.iter().all(|d| d.leaves_linear(module))
    }

    /// Whether any delta mixes sequence positions (see [`Delta::mixes_positions`]).
    pub fn mixes_positions(&self) -> bool {
        self.deltas.iter().any(|d| d.mixes_positions())
    }

    pub fn prefix_len(&self) -> usize {
        self.deltas.iter().map(|d| d.prefix_len()).sum()
    }

    /// All prefixes for `layer`, concatenated along the sequence axis.
    pub fn attention_prefix(
        &self,
        layer: usize,
        batch: usize,
        params: &ParamStore,
    ) -> Result<Option<(Tensor, Tensor)>> {
        let mut ks = vec![];
        let mut vs = vec![];
        for d in &self.deltas {
            if let Some((k, v)) = d.attention_prefix(layer, batch, params)? {
                ks.push(k);
                vs.push(v);
            }
        }
        if ks.is_empty() {
            return Ok(None);
        }
        Ok(Some((Tensor::cat(&ks, 2)?, Tensor::cat(&vs, 2)?)))
    }

    pub fn virtual_tokens(&self) -> usize {
        self.deltas.iter().map(|d| d.virtual_tokens()).sum()
    }

    pub fn input_embeddings(&self, x: Tensor, params: &ParamStore) -> Result<Tensor> {
        self.deltas
            .iter()
            .try_fold(x, |x, d| d.input_embeddings(x, params))
    }

    pub fn after_attention(&self, layer: usize, h: Tensor, params: &ParamStore) -> Result<Tensor> {
        self.deltas
            .iter()
            .try_fold(h, |h, d| d.after_attention(layer, h, params))
    }

    pub fn after_ffn(
        &self,
        layer: usize,
        x: &Tensor,
        out: Tensor,
        params: &ParamStore,
    ) -> Result<Tensor> {
        self.deltas
            .iter()
            .try_fold(out, |o, d| d.after_ffn(layer, x, o, params))
    }

    /// A copy of `base` with every delta folded in. Fails, without a partial result, if any delta
    /// cannot be merged.
    pub fn merge(&self, base: &ParamStore, params: &ParamStore) -> Result<ParamStore> {
        if let Some(d) = self.deltas.iter().find(|d| !d.mergeable()) {
            return Err(Error::invalid(format!(
                "{} changes the computation, not the weights: it cannot be merged into the base model",
                d.method()
            )));
        }
        let mut out = base.clone();
        for d in &self.deltas {
            d.merge(&mut out, params)?;
        }
        Ok(out)
    }
}

impl DeltaSet {
    /// The base store back from a merged one (every delta unmerged, in reverse order).
    pub fn unmerge(&self, merged: &ParamStore, params: &ParamStore) -> Result<ParamStore> {
        let mut out = merged.clone();
        for d in self.deltas.iter().rev() {
            d.unmerge(&mut out, params)?;
        }
        Ok(out)
    }
}

/// The linear modules of a base store: `(module name, out features, in features)` for every 2-d
/// `*.weight` tensor except embeddings and the LM head.
pub fn linear_modules(base: &ParamStore) -> Vec<(String, usize, usize)> {
    // Dense entries, then quantized ones (each in the store's canonical order; a base is usually
    // all one or the other, so the modules keep the canonical order that seeded inits rely on).
    let quantized: Vec<(&str, [usize; 2])> = base
        .quantized_entries()
        .map(|(n, q)| (n, [q.dims().0, q.dims().1]))
        .collect();
    base.iter()
        .map(|(name, p)| (name, p.tensor().dims()))
        .chain(quantized.iter().map(|(n, d)| (*n, d.as_slice())))
        .filter_map(|(name, dims)| {
            let module = name.strip_suffix(".weight")?;
            let excluded = module.ends_with("embed_tokens")
                || module.ends_with("lm_head")
                || module.contains("embeddings")
                || module.ends_with("LayerNorm");
            match dims {
                [o, i] if !excluded => Some((module.to_string(), *o, *i)),
                _ => None,
            }
        })
        .collect()
}

/// Uniform(-bound, bound) values from a seeded generator.
pub(crate) fn uniform(rng: &mut rand::rngs::StdRng, n: usize, bound: f64) -> Vec<f32> {
    use rand::Rng;
    (0..n)
        .map(|_| rng.random_range(-bound..bound) as f32)
        .collect()
}

/// Normal(0, std) values from a seeded generator (Box-Muller).
pub(crate) fn normal(rng: &mut rand::rngs::StdRng, n: usize, std: f64) -> Vec<f32> {
    use rand::Rng;
    (0..n)
        .map(|_| {
            let u1: f64 = rng.random_range(f64::EPSILON..1.0);
            let u2: f64 = rng.random();
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * std) as f32
        })
        .collect()
}
