//! Scaled dot-product attention with grouped-query heads and additive masks, composed from
//! matmuls and the softmax kernel (so its backward is exact and second-order capable).

use candle_core::{DType, Device, Result, Tensor};

use super::softmax_last_dim;

/// The additive value used to mask a position. Finite, so a fully masked row (left padding)
/// yields a uniform distribution instead of NaN.
pub const MASKED: f64 = -1e9;

/// `q: [b, h, tq, d]`, `k, v: [b, h_kv, tk, d]` with `h` a multiple of `h_kv` (GQA), `mask`
/// additive and broadcastable to `[b, h, tq, tk]`. Returns `[b, h, tq, d]`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let (b, h, tq, d) = q.dims4()?;
    let (_, hkv, tk, _) = k.dims4()?;
    if h % hkv != 0 {
        candle_core::bail!("attention: {h} query heads is not a multiple of {hkv} key/value heads");
    }
    let rep = h / hkv;
    // Query heads sharing a key/value head are stacked along the sequence axis, so GQA needs no
    // copy of k and v.
    let q = q.contiguous()?.reshape((b, hkv, rep * tq, d))?;
    let kt = matmul_ready(k)?.transpose(2, 3)?;
    let scores = (q.matmul(&kt)? * scale)?.reshape((b, h, tq, tk))?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(&m.to_dtype(scores.dtype())?)?,
        None => scores,
    };
    let p = softmax_last_dim(&scores)?;
    p.reshape((b, hkv, rep * tq, tk))?
        .matmul(&matmul_ready(v)?)?
        .reshape((b, h, tq, d))
}

/// `t` `[b, h, s, d]` itself when candle's matmul can read it in place (a KV-cache slice: the
/// heads evenly strided, unit stride inside a row), else a contiguous copy. Copying the cache cost
/// a whole cache per layer per decoded token.
fn matmul_ready(t: &Tensor) -> Result<Tensor> {
    let (s, d) = (t.stride(), t.dims());
    if (d[0] == 1 || s[0] == s[1] * d[1]) && s[3] == 1 {
        Ok(t.clone())
    } else {
        t.contiguous()
    }
}

/// Causal mask `[1, 1, tq, tk]` for queries at positions `offset .. offset + tq` over keys
/// `0 .. tk` (`tk = offset + tq` with a KV cache).
pub fn causal_mask(
    tq: usize,
    tk: usize,
    offset: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let v: Vec<f32> = (0..tq)
        .flat_map(|i| (0..tk).map(move |j| if j > i + offset { MASKED as f32 } else { 0.0 }))
        .collect();
    Tensor::from_vec(v, (1, 1, tq, tk), device)?.to_dtype(dtype)
}

/// Padding mask `[b, 1, 1, tk]` from an attention mask `[b, tk]` of 1 (keep) and 0 (pad).
pub fn padding_mask(attention_mask: &Tensor, dtype: DType) -> Result<Tensor> {
    let (b, tk) = attention_mask.dims2()?;
    let keep = attention_mask.to_dtype(DType::F32)?;
    ((1.0 - keep)? * MASKED)?
        .reshape((b, 1, 1, tk))?
        .to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check, randn_f64};

    #[test]
    fn causal_gqa_gradient_matches_finite_differences() -> Result<()> {
        let q = randn_f64(&[1, 4, 3, 4], 61, 1.0)?;
        let k = randn_f64(&[1, 2, 3, 4], 62, 1.0)?;
        let v = randn_f64(&[1, 2, 3, 4], 63, 1.0)?;
        let mask = causal_mask(3, 3, 0, DType::F64, &Device::Cpu)?;
        let err = check(
            |t| attention(&t[0], &t[1], &t[2], Some(&mask), 0.5),
            &[q, k, v],
            1e-6,
        )?;
        assert!(err < 1e-7, "rel error {err}");
        Ok(())
    }

    #[test]
    fn padded_gradient_matches_finite_differences() -> Result<()> {
        let q = randn_f64(&[2, 2, 3, 4], 64, 1.0)?;
        let k = randn_f64(&[2, 2, 3, 4], 65, 1.0)?;
        let v = randn_f64(&[2, 2, 3, 4], 66, 1.0)?;
        // Right padding: every query keeps at least one key (a fully masked row is uniform by design).
        let am = Tensor::new(&[[1u32, 1, 1], [1, 1, 0]], &Device::Cpu)?;
        let mask = causal_mask(3, 3, 0, DType::F64, &Device::Cpu)?
            .broadcast_add(&padding_mask(&am, DType::F64)?)?;
        let err = check(
            |t| attention(&t[0], &t[1], &t[2], Some(&mask), 0.5),
            &[q, k, v],
            1e-6,
        )?;
        assert!(err < 1e-7, "rel error {err}");
        Ok(())
    }

    #[test]
    fn gqa_equals_repeated_heads() -> Result<()> {
        let q = randn_f64(&[1, 4, 3, 4], 67, 1.0)?;
        let k = randn_f64(&[1, 2, 3, 4], 68, 1.0)?;
        let v = randn_f64(&[1, 2, 3, 4], 69, 1.0)?;
        let gqa = attention(&q, &k, &v, None, 0.5)?;
        // Hugging Face's repeat_kv: kv head j serves query heads j*rep .. (j+1)*rep.
        let rep = |t: &Tensor| -> Result<Tensor> {
            t.unsqueeze(2)?
                .expand((1, 2, 2, 3, 4))?
                .reshape((1, 4, 3, 4))
        };
        let full = attention(&q, &rep(&k)?, &rep(&v)?, None, 0.5)?;
        let diff = (gqa - full)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-12);
        Ok(())
    }
}
