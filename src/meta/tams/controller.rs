//! The TAMS controller: task embedding -> `FC(d->h)-ReLU-FC(h->9*6)` -> softmax per edge, soft or
//! straight-through hard.

use candle_core::{DType, Tensor};
use rand::{rngs::StdRng, Rng};

use super::{embedding_name, NUM_EDGES, NUM_OPS};
use crate::ops::{linear, softmax_last_dim};
use crate::params::ParamStore;
use crate::{Error, Result};

/// How architecture weights are formed from the controller's per-edge softmax.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArchMode {
    /// The softmax itself: every op mixed in.
    Soft,
    /// One-hot of the argmax in the forward, the softmax's gradient in the backward.
    Hard,
}

#[derive(Clone, Debug)]
pub struct Controller {
    gumbel_temperature: Option<f64>,
}

impl Controller {
    /// A controller; `gumbel_temperature` turns on Gumbel-softmax when an RNG is given.
    pub fn new(gumbel_temperature: Option<f64>) -> Self {
        Self { gumbel_temperature }
    }

    /// Unnormalised scores `[9, 6]` for a task embedding `[d]`.
    pub fn logits(&self, task_embedding: &Tensor, params: &ParamStore) -> Result<Tensor> {
        let p = |n: &str| params.get(&format!("tams.controller.{n}"));
        let w1 = p("fc1.weight")?;
        let d = w1.dim(1)?;
        if task_embedding.dims() != [d] {
            return Err(Error::invalid(format!(
                "tams controller: the task embedding must be [{d}], got {:?}",
                task_embedding.dims()
            )));
        }
        let x = task_embedding.to_dtype(w1.dtype())?.unsqueeze(0)?;
        let h = linear(&x, w1, Some(p("fc1.bias")?))?.relu()?;
        let s = linear(&h, p("fc2.weight")?, Some(p("fc2.bias")?))?;
        Ok(s.reshape((NUM_EDGES, NUM_OPS))?)
    }

    /// Architecture weights `[9, 6]` for a task embedding `[d]`.
    ///
    /// With a Gumbel temperature configured and `rng` given (training), Gumbel noise is added to
    /// the scores and they are divided by the temperature before the softmax; otherwise the
    /// softmax of the plain scores (deterministic, for evaluation and for saving architectures).
    pub fn arch_weights(
        &self,
        task_embedding: &Tensor,
        params: &ParamStore,
        mode: ArchMode,
        rng: Option<&mut StdRng>,
    ) -> Result<Tensor> {
        let mut s = self.logits(task_embedding, params)?;
        if let (Some(tau), Some(rng)) = (self.gumbel_temperature, rng) {
            let g: Vec<f64> = (0..NUM_EDGES * NUM_OPS)
                .map(|_| {
                    let u: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
                    -(-u.ln()).ln()
                })
                .collect();
            let g = Tensor::from_vec(g, (NUM_EDGES, NUM_OPS), s.device())?.to_dtype(s.dtype())?;
            s = (s + g)?.affine(1.0 / tau, 0.0)?;
        }
        let soft = softmax_last_dim(&s)?;
        match mode {
            ArchMode::Soft => Ok(soft),
            ArchMode::Hard => straight_through(&soft),
        }
    }
}

/// `one_hot(argmax) + soft - soft.detach()`: exactly one-hot in value, the softmax's gradient in
/// the backward. The difference is taken first so the value is not rounded away from one-hot.
pub fn straight_through(soft: &Tensor) -> Result<Tensor> {
    let hard = super::Architecture::from_weights(soft)?.one_hot(soft.dtype(), soft.device())?;
    Ok(((soft - soft.detach())? + hard)?)
}

/// The task embedding `[d]`: the mean input token embedding over the support set's non-pad
/// tokens, detached (the controller learns from it; the embeddings are not tuned through it).
///
/// `token_ids: [b, t]` (or `[t]`), `mask` the same shape with 1 for real tokens and 0 for padding
/// (none: every token counts).
pub fn task_embedding(
    base: &ParamStore,
    token_ids: &Tensor,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let name = embedding_name(base)?;
    let ids: Vec<u32> = token_ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1()?;
    let keep: Vec<u32> = match mask {
        Some(m) => {
            if m.dims() != token_ids.dims() {
                return Err(Error::invalid(format!(
                    "tams task embedding: mask {:?} does not match token ids {:?}",
                    m.dims(),
                    token_ids.dims()
                )));
            }
            let m: Vec<u32> = m.flatten_all()?.to_dtype(DType::U32)?.to_vec1()?;
            ids.iter()
                .zip(&m)
                .filter(|(_, &k)| k != 0)
                .map(|(&i, _)| i)
                .collect()
        }
        None => ids,
    };
    if keep.is_empty() {
        return Err(Error::invalid(
            "tams task embedding: the support set has no (non-pad) tokens",
        ));
    }
    let n = keep.len();
    if let Some(q) = base.quantized(name) {
        // A quantized base: dequantize only the support set's rows (ids checked there).
        let idx = Tensor::from_vec(keep, n, token_ids.device())?;
        return Ok(q.rows(&idx)?.mean(0)?);
    }
    let emb = base.get(name)?;
    let vocab = emb.dim(0)?;
    if let Some(bad) = keep.iter().find(|&&i| i as usize >= vocab) {
        return Err(Error::invalid(format!(
            "tams task embedding: token id {bad} is outside the vocabulary ({vocab})"
        )));
    }
    let dtype = if emb.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let idx = Tensor::from_vec(keep, n, emb.device())?;
    Ok(emb
        .detach()
        .index_select(&idx, 0)?
        .to_dtype(dtype)?
        .mean(0)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlDType;

    #[test]
    fn task_embedding_reads_a_quantized_embedding_like_its_dequantized_rows() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let mut dense = ParamStore::new();
        dense.insert_frozen(
            "model.embed_tokens.weight",
            Tensor::randn(0f32, 1.0, (40, 64), &dev)?,
        );
        let q = dense.quantize_matrices(GgmlDType::Q8_0)?;
        let reference = q.dequantized()?;
        let ids = Tensor::new(&[[3u32, 7, 7, 0], [39, 1, 0, 0]], &dev)?;
        let mask = Tensor::new(&[[1u32, 1, 1, 0], [1, 1, 0, 0]], &dev)?;
        for m in [None, Some(&mask)] {
            let a = task_embedding(&q, &ids, m)?;
            let b = task_embedding(&reference, &ids, m)?;
            let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d < 1e-6, "{d}");
        }
        let none = Tensor::zeros((1, 4), DType::U32, &dev)?;
        assert!(task_embedding(&q, &ids, Some(&none.broadcast_as((2, 4))?.contiguous()?)).is_err());
        Ok(())
    }
}
