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
        Some(m) => add_mask(&scores, m)?,
        None => scores,
    };
    let p = softmax_last_dim(&scores)?;
    p.reshape((b, hkv, rep * tq, tk))?
        .matmul(&matmul_ready(v)?)?
        .reshape((b, h, tq, d))
}

/// `scores + mask` with `mask` broadcastable to `scores: [b, h, tq, tk]`, the mask held as a
/// constant: a plain `broadcast_add` would also compute a `[b, h, tq, tk]` gradient for the mask
/// and candle would keep it until the backward pass ends (one per layer).
fn add_mask(scores: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let mask = mask.to_dtype(scores.dtype())?;
    if !super::fused_ok(scores) || mask.rank() != 4 {
        return scores.broadcast_add(&mask);
    }
    let dims = scores.dims4()?;
    let md = mask.dims4()?;
    let fits = |m: usize, s: usize| m == s || m == 1;
    if !(fits(md.0, dims.0) && fits(md.1, dims.1) && fits(md.2, dims.2) && md.3 == dims.3) {
        candle_core::bail!("attention: mask {md:?} does not broadcast to scores {dims:?}");
    }
    scores.contiguous()?.apply_op1(AddMask {
        mask: mask.contiguous()?.detach(),
    })
}

struct AddMask {
    mask: Tensor,
}

impl AddMask {
    fn run<T: candle_core::WithDType + std::ops::Add<Output = T>>(
        &self,
        s: &[T],
        (b, h, q, k): (usize, usize, usize, usize),
    ) -> Result<Vec<T>> {
        let (mb, mh, mq, _) = self.mask.dims4()?;
        let m = self.mask.flatten_all()?.to_vec1::<T>()?;
        let mut out = Vec::with_capacity(s.len());
        for bi in 0..b {
            for hi in 0..h {
                for qi in 0..q {
                    let row = ((bi % mb * mh + hi % mh) * mq + qi % mq) * k;
                    let at = ((bi * h + hi) * q + qi) * k;
                    out.extend(
                        s[at..at + k]
                            .iter()
                            .zip(&m[row..row + k])
                            .map(|(&a, &b)| a + b),
                    );
                }
            }
        }
        Ok(out)
    }
}

impl candle_core::CustomOp1 for AddMask {
    fn name(&self) -> &'static str {
        "metapeft-add-mask"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage as C;
        let dims = l.shape().dims4()?;
        let out = match s {
            C::F32(_) => C::F32(self.run(super::cpu_slice::<f32>(s, l)?, dims)?),
            C::F64(_) => C::F64(self.run(super::cpu_slice::<f64>(s, l)?, dims)?),
            _ => candle_core::bail!("attention mask: f32 or f64 scores"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _s: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(g.clone()))
    }
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

    #[test]
    fn mask_op_equals_broadcast_add_and_passes_the_gradient_through() -> Result<()> {
        let s = crate::ops::gradcheck::randn_f64(&[2, 3, 4, 5], 61, 1.0)?;
        for shape in [[1, 1, 4, 5], [2, 1, 1, 5], [2, 1, 4, 5], [2, 3, 4, 5]] {
            let m = crate::ops::gradcheck::randn_f64(&shape, 62, 1.0)?;
            let want = s.broadcast_add(&m)?;
            let got = add_mask(&s, &m)?;
            let d = (got - want)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(d == 0.0, "mask {shape:?}: differs by {d}");
        }
        let v = candle_core::Var::from_tensor(&s)?;
        let m = crate::ops::gradcheck::randn_f64(&[1, 1, 4, 5], 63, 1.0)?;
        let w = crate::ops::gradcheck::randn_f64(&[2, 3, 4, 5], 64, 1.0)?;
        let g = (add_mask(v.as_tensor(), &m)? * &w)?.sum_all()?.backward()?;
        let gv = g.get(v.as_tensor()).unwrap();
        assert_eq!((gv - &w)?.abs()?.max_all()?.to_scalar::<f64>()?, 0.0);
        assert!(add_mask(
            &s,
            &crate::ops::gradcheck::randn_f64(&[1, 1, 3, 5], 65, 1.0)?
        )
        .is_err());
        Ok(())
    }
}
