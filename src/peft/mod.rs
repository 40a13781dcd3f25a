//! Deltas: the trainable "difference" attached to a frozen base.
//!
//! A model calls its [`DeltaSet`] at every site where a delta may act (today: after each linear
//! layer, with the module's Hugging Face name such as `model.layers.3.self_attn.q_proj`). Each delta
//! reads its own parameters from a separate [`ParamStore`], so the base store is never touched.

pub mod lora;

use candle_core::Tensor;

use crate::params::ParamStore;
use crate::Result;

/// One delta method. Methods override the sites they act on; the defaults leave the base alone.
pub trait Delta: Send + Sync + std::fmt::Debug {
    /// Adjust the output `y = x W^T (+ b)` of the linear layer `module`.
    fn linear(
        &self,
        _module: &str,
        _x: &Tensor,
        y: Tensor,
        _params: &ParamStore,
    ) -> Result<Tensor> {
        Ok(y)
    }
}

/// The deltas attached to a model, applied in order.
#[derive(Debug, Default)]
pub struct DeltaSet {
    deltas: Vec<Box<dyn Delta>>,
}

impl DeltaSet {
    /// No delta: the plain base model.
    pub fn none() -> Self {
        Self::default()
    }

    pub fn push(&mut self, d: impl Delta + 'static) {
        self.deltas.push(Box::new(d));
    }

    pub fn is_empty(&self) -> bool {
        self.deltas.is_empty()
    }

    pub fn linear(
        &self,
        module: &str,
        x: &Tensor,
        y: Tensor,
        params: &ParamStore,
    ) -> Result<Tensor> {
        self.deltas
            .iter()
            .try_fold(y, |y, d| d.linear(module, x, y, params))
    }
}

/// The linear modules of a base store: `(module name, out features, in features)` for every 2-d
/// `*.weight` tensor except embeddings and the LM head.
pub fn linear_modules(base: &ParamStore) -> Vec<(String, usize, usize)> {
    base.iter()
        .filter_map(|(name, p)| {
            let module = name.strip_suffix(".weight")?;
            let dims = p.tensor().dims();
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
