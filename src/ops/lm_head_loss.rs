//! The language-model head and the mean cross-entropy as one op: `loss = CE(h W^T, targets)` for
//! `W: [vocab, d]`, computed a block of rows at a time so the `[tokens, vocab]` logits
//! (100 MB for 4 x 128 tokens over SmolLM2's 49152 classes) are never materialised, nor their
//! gradient, softmax, one-hot and the other full-size temporaries of the unfused backward.
//!
//! First-order: the forward already holds each block's softmax, so it also computes the hidden
//! state gradient `(softmax - onehot) W / count` there (the same matmul the backward would do) and
//! the backward only scales it by the incoming gradient. On a thread that keeps the graph of
//! gradients (second-order MAML), or if the op is differentiated twice, the backward is instead
//! built from differentiable ops (frozen matmuls and our softmax), so gradients of gradients stay
//! exact. A trainable `W` (full fine-tuning of a tied head) gets its gradient `sum over blocks of
//! dlogits^T h` in the same loop; with a graph of gradients kept it takes the unfused path.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Device, Layout, Result, Shape, Tensor, WithDType,
};
use num_traits::Float;
use rayon::prelude::*;

use super::exp::{exp_from_max, ExpSlice};
use super::{cross_entropy, fused_ok, linear, softmax_last_dim};
use crate::ops::frozen_linear::{frozen_linear, frozen_matmul};
use crate::ops::par_gemm::{self, Strided};
use crate::ops::quantized_linear::{
    quantized_linear_exact, quantized_linear_t, quantized_product, QuantizedWeight,
};

/// Logit elements per block: up to 128 MB of f32 (all 512 rows of a 4 x 128 SmolLM2 batch), in
/// a buffer kept from call to call ([`LOGITS`]). Each block's products transpose and pack the
/// whole head again, so smaller blocks cost time (SmolLM2 LoRA step, alternated A/B: 16 MB
/// blocks 1.04-1.10x the time of 64 MB ones, 32 MB ones 1.01x; see BENCHMARKS.md for one block).
const BLOCK_ELEMS: usize = 1 << 25;

/// The f32 logits buffer, kept between calls: a block beyond glibc's 32 MiB mmap ceiling would
/// otherwise be a fresh mapping, faulted in and zeroed page by page, at every call.
static LOGITS: Mutex<Vec<f32>> = Mutex::new(Vec::new());

struct LmHeadCe {
    targets: Vec<i64>,
    ignore_index: i64,
    count: usize,
    /// Compute the hidden-state gradient in the forward (first-order training).
    want_grad: bool,
    grad: Mutex<Option<Tensor>>,
    /// Compute the weight's gradient in the forward too (a trainable head; needs `want_grad`).
    want_w_grad: bool,
    w_grad: Mutex<Option<Tensor>>,
    /// Logit elements per block of the dense head ([`BLOCK_ELEMS`]; smaller in tests).
    block_elems: usize,
}

/// The loss and, when wanted, the hidden states' and the weight's gradients.
type BlockedGrads<T> = (T, Option<Vec<T>>, Option<Vec<T>>);

/// Owned data of a CPU storage of a known dtype.
trait Owned:
    WithDType
    + Float
    + ExpSlice
    + std::ops::AddAssign
    + std::ops::MulAssign
    + std::ops::SubAssign
    + Send
    + Sync
{
    fn take(s: CpuStorage) -> Result<Vec<Self>>;

    /// A buffer of `len` values (contents unspecified) for a block's logits.
    fn scratch(len: usize) -> Vec<Self> {
        vec![Self::zero(); len]
    }

    /// Hands a block's buffer back for the next [`Owned::scratch`].
    fn recycle(_buf: Vec<Self>) {}
}

impl Owned for f32 {
    fn take(s: CpuStorage) -> Result<Vec<Self>> {
        match s {
            CpuStorage::F32(v) => Ok(v),
            _ => candle_core::bail!("lm_head_cross_entropy: expected f32"),
        }
    }

    fn scratch(len: usize) -> Vec<f32> {
        // Another thread holding the buffer (two heads at once) gets a fresh one.
        let mut buf = LOGITS
            .try_lock()
            .map(|mut b| std::mem::take(&mut *b))
            .unwrap_or_default();
        buf.resize(len, 0.0);
        buf
    }

    fn recycle(buf: Vec<f32>) {
        if let Ok(mut b) = LOGITS.try_lock() {
            if buf.capacity() >= b.capacity() {
                *b = buf;
            }
        }
    }
}

impl Owned for f64 {
    fn take(s: CpuStorage) -> Result<Vec<Self>> {
        match s {
            CpuStorage::F64(v) => Ok(v),
            _ => candle_core::bail!("lm_head_cross_entropy: expected f64"),
        }
    }
}

impl LmHeadCe {
    /// Loss (mean over counted rows) and, when wanted, the `[n, d]` hidden-state gradient.
    fn run<T: Owned>(
        &self,
        h: &CpuStorage,
        lh: &Layout,
        w: &CpuStorage,
        lw: &Layout,
    ) -> Result<BlockedGrads<T>> {
        let (n, d) = lh.shape().dims2()?;
        let (vocab, wd) = lw.shape().dims2()?;
        if wd != d {
            candle_core::bail!("lm_head_cross_entropy: hidden size {d} but weight {vocab}x{wd}");
        }
        let (h0, w0) = (lh.start_offset(), lw.start_offset());
        let w_t = Layout::contiguous_with_offset((vocab, d), w0).transpose(0, 1)?;
        let w_kn = Layout::contiguous_with_offset((vocab, d), w0);
        let dw = Mutex::new(self.want_w_grad.then(|| vec![T::zero(); vocab * d]));
        let (loss, dh) = self.blocks(
            (n, d, vocab),
            self.block_elems,
            |r0, m| {
                let lhs = Layout::contiguous_with_offset((m, d), h0 + r0 * d);
                if par_gemm::enabled() {
                    let (hs, ws) = (h.as_slice::<T>()?, w.as_slice::<T>()?);
                    let (hv, wv) = (
                        Strided::from_layout(hs, &lhs)?,
                        Strided::from_layout(ws, &w_t)?,
                    );
                    let mut logits = T::scratch(m * vocab);
                    par_gemm::matmul_to(&mut logits, (m, vocab, d), hv, wv)?;
                    return Ok(logits);
                }
                T::take(h.matmul(w, (1, m, vocab, d), &lhs, &w_t)?)
            },
            |dl, m, r0| {
                if let Some(acc) = dw.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
                    // dW += dlogits^T h for this block's rows, in place: a product per block
                    // would be a fresh 113 MB (SmolLM2) mapping, zeroed page by page.
                    let hv = Strided::row_major(h.as_slice::<T>()?, h0 + r0 * d, d);
                    let dlt = Strided::transposed(dl, 0, vocab);
                    par_gemm::matmul_acc(acc, (vocab, d, m), dlt, hv, T::one())?;
                }
                if par_gemm::enabled() {
                    let ws = Strided::from_layout(w.as_slice::<T>()?, &w_kn)?;
                    return par_gemm::matmul((m, d, vocab), Strided::row_major(dl, 0, vocab), ws);
                }
                let dl = T::to_cpu_storage_owned(dl.to_vec());
                let lay = Layout::contiguous((m, vocab));
                T::take(dl.matmul(w, (1, m, d, vocab), &lay, &w_kn)?)
            },
        )?;
        Ok((loss, dh, dw.into_inner().unwrap_or_else(|e| e.into_inner())))
    }

    /// The blocked loop over `block_elems / vocab` rows at a time: `logits(r0, m)` gives a block's
    /// `[m, vocab]` logits, `grad(dlogits, m, r0)` its `[m, d]` hidden-state gradient. The
    /// logits' buffer goes back to [`Owned::recycle`] after each block.
    fn blocks<T: Owned>(
        &self,
        (n, d, vocab): (usize, usize, usize),
        block_elems: usize,
        logits_of: impl Fn(usize, usize) -> Result<Vec<T>>,
        grad_of: impl Fn(&[T], usize, usize) -> Result<Vec<T>>,
    ) -> Result<(T, Option<Vec<T>>)> {
        let rows = (block_elems / vocab.max(1)).clamp(1, n.max(1));
        let scale = 1.0 / self.count.max(1) as f64;
        let mut total = 0f64;
        let mut dh = if self.want_grad {
            Some(vec![T::zero(); n * d])
        } else {
            None
        };
        let mut r0 = 0;
        while r0 < n {
            let m = rows.min(n - r0);
            let mut logits = logits_of(r0, m)?;
            let targets = &self.targets[r0..r0 + m];
            for &t in targets {
                if t != self.ignore_index && (t < 0 || t as usize >= vocab) {
                    candle_core::bail!(
                        "lm_head_cross_entropy: target {t} outside the {vocab} classes"
                    );
                }
            }
            let want = self.want_grad;
            let ignore = self.ignore_index;
            total += logits
                .par_chunks_mut(vocab)
                .zip(targets.par_iter())
                .map(|(row, &t)| {
                    if t == ignore {
                        if want {
                            row.iter_mut().for_each(|v| *v = T::zero());
                        }
                        return 0f64;
                    }
                    let t = t as usize;
                    let picked = WithDType::to_f64(row[t]);
                    // In place: the block's logits are not needed afterwards.
                    let (max, sum) = exp_from_max(row);
                    let lse = WithDType::to_f64(max) + sum.ln();
                    if want {
                        let k = T::from(scale / sum).unwrap_or_else(T::nan);
                        row.iter_mut().for_each(|v| *v *= k);
                        row[t] -= T::from(scale).unwrap_or_else(T::nan);
                    }
                    lse - picked
                })
                .sum::<f64>();
            if let Some(dh) = dh.as_mut() {
                let g = grad_of(&logits, m, r0)?;
                dh[r0 * d..(r0 + m) * d].copy_from_slice(&g);
            }
            T::recycle(logits);
            r0 += m;
        }
        let loss = T::from(total * scale).unwrap_or_else(T::nan);
        Ok((loss, dh))
    }

    fn fwd_t<T: Owned>(
        &self,
        h: &CpuStorage,
        lh: &Layout,
        w: &CpuStorage,
        lw: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, d) = lh.shape().dims2()?;
        let (loss, dh, dw) = self.run::<T>(h, lh, w, lw)?;
        if let Some(dh) = dh {
            self.store_grad(Tensor::from_vec(dh, (n, d), &Device::Cpu)?);
        }
        if let Some(dw) = dw {
            let dw = Tensor::from_vec(dw, lw.shape(), &Device::Cpu)?;
            *self.w_grad.lock().unwrap_or_else(|e| e.into_inner()) = Some(dw);
        }
        Ok((T::to_cpu_storage_owned(vec![loss]), Shape::from(())))
    }
}

impl CustomOp2 for LmHeadCe {
    fn name(&self) -> &'static str {
        "metapeft-lm-head-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => self.fwd_t::<f32>(s1, l1, s2, l2),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => self.fwd_t::<f64>(s1, l1, s2, l2),
            _ => candle_core::bail!("lm_head_cross_entropy: unsupported dtypes"),
        }
    }

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        _loss: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if self.count == 0 {
            return Ok((Some(h.zeros_like()?), None));
        }
        if let Some(dh) = self.cached_grad() {
            let dw = self.w_grad.lock().unwrap_or_else(|e| e.into_inner()).take();
            let dw = match dw {
                Some(dw) => Some(dw.broadcast_mul(g)?),
                None => None,
            };
            return Ok((Some(dh.broadcast_mul(g)?), dw));
        }
        // Differentiable form (second order): (softmax(h W^T) - onehot) * keep W.
        let dl = self.dlogits(h, &frozen_linear(h, w)?, g)?;
        let dw = match w.track_op() {
            true => Some(dl.t()?.matmul(h)?),
            false => None,
        };
        Ok((Some(frozen_matmul(&dl, w)?), dw))
    }
}

impl LmHeadCe {
    /// The logits' gradient `(softmax(logits) - onehot) * g / count` (zero on ignored rows) from
    /// differentiable ops: the backward on a thread that keeps the graph of gradients.
    fn dlogits(&self, h: &Tensor, logits: &Tensor, g: &Tensor) -> Result<Tensor> {
        let (n, vocab) = logits.dims2()?;
        let mut onehot = vec![0f32; n * vocab];
        let mut keep = vec![0f64; n]; // f64: 1/count exact for f64 gradients
        for (i, &t) in self.targets.iter().enumerate() {
            if t != self.ignore_index {
                onehot[i * vocab + t as usize] = 1.0;
                keep[i] = 1.0 / self.count as f64;
            }
        }
        let onehot = Tensor::from_vec(onehot, (n, vocab), h.device())?.to_dtype(h.dtype())?;
        let keep = Tensor::from_vec(keep, (n, 1), h.device())?.to_dtype(h.dtype())?;
        (softmax_last_dim(logits)? - onehot)?
            .broadcast_mul(&keep)?
            .broadcast_mul(g)
    }

    fn cached_grad(&self) -> Option<Tensor> {
        self.grad.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    fn store_grad(&self, dh: Tensor) {
        *self.grad.lock().unwrap_or_else(|e| e.into_inner()) = Some(dh);
    }
}

/// Logit elements per block with a quantized head (64 MB of f32): every block dequantizes the
/// whole head (tile by tile) once, twice when training.
const QUANTIZED_BLOCK_ELEMS: usize = 1 << 24;

/// [`LmHeadCe`] with the head kept as GGUF blocks (QLoRA-style training): each block's logits
/// come from the quantized weight's exact tiled product, so neither the `[tokens, vocab]` logits
/// nor a dense copy of the head ever exist.
struct QuantizedLmHeadCe {
    ce: LmHeadCe,
    w: QuantizedWeight,
}

impl CustomOp1 for QuantizedLmHeadCe {
    fn name(&self) -> &'static str {
        "metapeft-quantized-lm-head-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, d) = l.shape().dims2()?;
        let (vocab, wd) = self.w.dims();
        if wd != d {
            candle_core::bail!("lm_head_cross_entropy: hidden size {d} but weight {vocab}x{wd}");
        }
        let x = match (s, l.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, b))) => &v[a..b],
            _ => candle_core::bail!("lm_head_cross_entropy: a quantized head takes contiguous f32"),
        };
        let (loss, dh) = self.ce.blocks::<f32>(
            (n, d, vocab),
            QUANTIZED_BLOCK_ELEMS,
            |r0, m| quantized_product(&self.w, &x[r0 * d..(r0 + m) * d], m, false),
            |dl, m, _| quantized_product(&self.w, dl, m, true),
        )?;
        if let Some(dh) = dh {
            self.ce
                .store_grad(Tensor::from_vec(dh, (n, d), &Device::Cpu)?);
        }
        Ok((CpuStorage::F32(vec![loss]), Shape::from(())))
    }

    fn bwd(&self, h: &Tensor, _loss: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        if self.ce.count == 0 {
            return Ok(Some(h.zeros_like()?));
        }
        if let Some(dh) = self.ce.cached_grad() {
            return Ok(Some(dh.broadcast_mul(g)?));
        }
        let dl = self
            .ce
            .dlogits(h, &quantized_linear_exact(h, &self.w)?, g)?;
        Ok(Some(quantized_linear_t(&dl, &self.w)?))
    }
}

/// [`lm_head_cross_entropy`] for a head kept quantized (`W: [vocab, d]` as GGUF blocks): the
/// same value and gradients as `cross_entropy(&quantized_linear(hidden, w), targets,
/// ignore_index)` without materialising the logits.
pub fn quantized_lm_head_cross_entropy(
    hidden: &Tensor,
    w: &QuantizedWeight,
    targets: &Tensor,
    ignore_index: i64,
) -> Result<Tensor> {
    let d = hidden.dim(candle_core::D::Minus1)?;
    let h = hidden.reshape(((), d))?;
    if !h.device().is_cpu() || h.dtype() != DType::F32 {
        let logits = quantized_linear_exact(&h, w)?;
        return cross_entropy(&logits, targets, ignore_index);
    }
    let ce = LmHeadCe::new(&h, targets, ignore_index)?;
    h.contiguous()?
        .apply_op1(QuantizedLmHeadCe { ce, w: w.clone() })
}

/// Mean cross-entropy of the logits `hidden W^T` (`hidden: [..., d]`, `W: [vocab, d]`) against
/// `targets: [...]`, skipping `ignore_index`; the same value and gradients as
/// `cross_entropy(&linear(hidden, w, None), targets, ignore_index)` without materialising the
/// logits when the tensors are on the CPU in f32/f64 (and, for a trainable `W`, the hidden
/// states are trained too and no graph of gradients is kept).
pub fn lm_head_cross_entropy(
    hidden: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    ignore_index: i64,
) -> Result<Tensor> {
    in_blocks(hidden, w, targets, ignore_index, BLOCK_ELEMS)
}

/// [`lm_head_cross_entropy`] with `block_elems` logits per block.
fn in_blocks(
    hidden: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    ignore_index: i64,
    block_elems: usize,
) -> Result<Tensor> {
    let d = hidden.dim(candle_core::D::Minus1)?;
    let h = hidden.reshape(((), d))?;
    let mut ce = LmHeadCe::new(&h, targets, ignore_index)?;
    ce.block_elems = block_elems;
    if !fused_ok(&h) || (w.track_op() && !ce.want_grad) {
        return cross_entropy(&linear(&h, w, None)?, targets, ignore_index);
    }
    ce.want_w_grad = w.track_op();
    let w = if w.dtype() != h.dtype() {
        w.to_dtype(h.dtype())?
    } else {
        w.clone()
    };
    let w = match ce.want_w_grad {
        true => w.contiguous()?,
        false => w.contiguous()?.detach(),
    };
    h.contiguous()?.apply_op2(&w, ce)
}

impl LmHeadCe {
    /// The op's state for hidden states `h: [n, d]` and `n` targets.
    fn new(h: &Tensor, targets: &Tensor, ignore_index: i64) -> Result<Self> {
        let targets: Vec<i64> = targets.flatten_all()?.to_dtype(DType::I64)?.to_vec1()?;
        if targets.len() != h.dim(0)? {
            candle_core::bail!(
                "lm_head_cross_entropy: {} targets for {} rows",
                targets.len(),
                h.dim(0)?
            );
        }
        let count = targets.iter().filter(|&&t| t != ignore_index).count();
        Ok(LmHeadCe {
            targets,
            ignore_index,
            count,
            want_grad: h.track_op() && !crate::meta::second_order::keeps_grad_graph(),
            grad: Mutex::new(None),
            want_w_grad: false,
            w_grad: Mutex::new(None),
            block_elems: BLOCK_ELEMS,
        })
    }
}

/// The same op, forcing the precomputed (`true`) or the differentiable (`false`) backward.
#[cfg(test)]
fn with_mode(hidden: &Tensor, w: &Tensor, targets: &[i64], precompute: bool) -> Result<Tensor> {
    let count = targets.iter().filter(|&&t| t != -100).count();
    hidden.contiguous()?.apply_op2(
        &w.detach(),
        LmHeadCe {
            targets: targets.to_vec(),
            ignore_index: -100,
            count,
            want_grad: precompute,
            grad: Mutex::new(None),
            want_w_grad: false,
            w_grad: Mutex::new(None),
            block_elems: BLOCK_ELEMS,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check, randn_f64};
    use candle_core::Var;

    const TARGETS: [i64; 6] = [1, -100, 6, 0, 3, 6];

    #[test]
    fn both_backwards_match_finite_differences() -> Result<()> {
        let h = randn_f64(&[6, 5], 81, 1.0)?;
        let w = randn_f64(&[7, 5], 82, 1.0)?;
        for precompute in [true, false] {
            let err = check(
                |t| with_mode(&t[0], &w, &TARGETS, precompute),
                std::slice::from_ref(&h),
                1e-6,
            )?;
            assert!(err < 1e-7, "precompute {precompute}: rel error {err}");
        }
        Ok(())
    }

    /// A trained head (full fine-tuning of a tied embedding): the weight's gradient accumulates
    /// over blocks (5 here, the last one short) and equals the unfused one, as do the value and
    /// the hidden states'.
    #[test]
    fn a_trained_head_gets_the_unfused_gradients() -> Result<()> {
        let (n, vocab, d) = (1100, 16_000, 6);
        let block_elems = 250 * vocab;
        let h = Var::from_tensor(&randn_f64(&[n, d], 87, 1.0)?)?;
        let w = Var::from_tensor(&randn_f64(&[vocab, d], 88, 0.5)?)?;
        let t: Vec<i64> = (0..n as i64)
            .map(|i| {
                if i % 7 == 3 {
                    -100
                } else {
                    (i * 131) % vocab as i64
                }
            })
            .collect();
        let t = Tensor::new(t.as_slice(), &Device::Cpu)?;
        let fused = in_blocks(h.as_tensor(), w.as_tensor(), &t, -100, block_elems)?;
        let plain = cross_entropy(&linear(h.as_tensor(), w.as_tensor(), None)?, &t, -100)?;
        let (fv, pv) = (fused.to_scalar::<f64>()?, plain.to_scalar::<f64>()?);
        assert!((fv - pv).abs() < 1e-12 * pv.abs(), "{fv} vs {pv}");
        let (gf, gp) = ((fused * 3.0)?.backward()?, (plain * 3.0)?.backward()?);
        for v in [&h, &w] {
            let a = gf.get(v.as_tensor()).expect("fused gradient");
            let b = gp.get(v.as_tensor()).expect("unfused gradient");
            let scale = b.abs()?.max_all()?.to_scalar::<f64>()?;
            let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(diff <= 1e-12 * scale, "max |diff| {diff} (scale {scale})");
        }
        Ok(())
    }

    #[test]
    fn matches_unfused_value_and_gradient() -> Result<()> {
        let h = Var::from_tensor(&randn_f64(&[2, 3, 5], 83, 1.0)?)?;
        let w = randn_f64(&[7, 5], 84, 1.0)?;
        let t = Tensor::new(&[[1i64, -100, 6], [0, 3, 6]], &Device::Cpu)?;
        let fused = lm_head_cross_entropy(h.as_tensor(), &w, &t, -100)?;
        let plain = cross_entropy(&linear(h.as_tensor(), &w, None)?, &t, -100)?;
        let (a, b) = (fused.to_scalar::<f64>()?, plain.to_scalar::<f64>()?);
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        let ga = fused.backward()?.get(h.as_tensor()).cloned().unwrap();
        let gb = plain.backward()?.get(h.as_tensor()).cloned().unwrap();
        let diff = (ga - gb)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-12, "gradient differs by {diff}");
        // f32 in blocks of 1, 4 and all 6 rows agrees too, each block's logits in the buffer
        // the last one left behind (whatever it held).
        let h32 = h.as_tensor().to_dtype(DType::F32)?;
        let w32 = w.to_dtype(DType::F32)?;
        for rows in [1, 4, 6] {
            let a32 = in_blocks(&h32, &w32, &t, -100, rows * 7)?.to_scalar::<f32>()?;
            assert!(
                (a32 as f64 - b).abs() < 1e-5,
                "{rows} rows a block: {a32} vs {b}"
            );
        }
        Ok(())
    }

    #[test]
    fn quantized_head_matches_the_unfused_loss_first_and_second_order() -> Result<()> {
        use candle_core::quantized::GgmlDType;
        let dev = Device::Cpu;
        let t = Tensor::new(&[[1i64, -100, 60, 0], [33, 65, 6, 6]], &dev)?;
        let v = Tensor::randn(0f32, 1.0, (8, 64), &dev)?;
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_1] {
            let w = (Tensor::randn(0f32, 1.0, (70, 64), &dev)? * 0.2)?;
            let q = QuantizedWeight::quantize(&w, dtype)?;
            let h = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 4, 64), &dev)?)?;
            let fused = quantized_lm_head_cross_entropy(h.as_tensor(), &q, &t, -100)?;
            let logits = quantized_linear_exact(&h.as_tensor().reshape((8, 64))?, &q)?;
            let plain = cross_entropy(&logits, &t, -100)?;
            let (a, b) = (fused.to_scalar::<f32>()?, plain.to_scalar::<f32>()?);
            assert!((a - b).abs() < 1e-5 * b.abs(), "{dtype:?}: loss {a} vs {b}");
            let ga = fused.backward()?.get(h.as_tensor()).cloned().unwrap();
            let gb = plain.backward()?.get(h.as_tensor()).cloned().unwrap();
            let scale = gb.abs()?.max_all()?.to_scalar::<f32>()?;
            let diff = (&ga - &gb)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                diff < 1e-5 * scale,
                "{dtype:?}: gradient off by {diff} (scale {scale})"
            );
            // The differentiable backward (second-order MAML's thread): same gradient, and a
            // Hessian-vector product equal to the unfused one's.
            let hvp = |fused: bool| -> Result<(Tensor, Tensor)> {
                let (h, q, t, v) = (h.as_tensor().clone(), q.clone(), t.clone(), v.clone());
                crate::meta::second_order::on_graph_thread(move || {
                    let x = Var::from_tensor(&h)?;
                    let l = if fused {
                        quantized_lm_head_cross_entropy(x.as_tensor(), &q, &t, -100)?
                    } else {
                        let logits = quantized_linear_exact(&x.as_tensor().reshape((8, 64))?, &q)?;
                        cross_entropy(&logits, &t, -100)?
                    };
                    let g = l.backward()?.get(x.as_tensor()).cloned().unwrap();
                    let hv = (g.reshape((8, 64))? * &v)?
                        .sum_all()?
                        .backward()?
                        .get(x.as_tensor())
                        .cloned()
                        .unwrap();
                    Ok((g.detach(), hv.detach()))
                })
                .map_err(|e| candle_core::Error::Msg(e.to_string()))
            };
            let ((g1, hv1), (_, hv2)) = (hvp(true)?, hvp(false)?);
            let diff = (&g1 - &gb)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                diff < 1e-5 * scale,
                "{dtype:?}: graph-thread gradient off by {diff}"
            );
            let hs = hv2.abs()?.max_all()?.to_scalar::<f32>()?;
            let diff = (&hv1 - &hv2)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                hs > 0.0 && diff < 1e-4 * hs,
                "{dtype:?}: HVP off by {diff} (scale {hs})"
            );
        }
        Ok(())
    }

    #[test]
    fn second_derivative_of_differentiable_backward() -> Result<()> {
        // Hessian-vector product through the op's backward, against finite differences of its
        // gradient: the path second-order MAML takes.
        let h = randn_f64(&[6, 5], 85, 1.0)?;
        let w = randn_f64(&[7, 5], 86, 1.0)?;
        let v = randn_f64(&[6, 5], 87, 1.0)?;
        let grad_at = |x: &Tensor| -> Result<Tensor> {
            let x = Var::from_tensor(x)?;
            let l = with_mode(x.as_tensor(), &w, &TARGETS, false)?;
            Ok(l.backward()?.get(x.as_tensor()).cloned().unwrap())
        };
        let eps = 1e-5;
        let numeric =
            ((grad_at(&(&h + (&v * eps)?)?)? - grad_at(&(&h - (&v * eps)?)?)?)? / (2.0 * eps))?;
        let err = crate::meta::second_order::on_graph_thread(|| {
            let x = Var::from_tensor(&h)?;
            let l = lm_head_cross_entropy(
                x.as_tensor(),
                &w,
                &Tensor::new(&TARGETS, &Device::Cpu)?,
                -100,
            )?;
            let g = l.backward()?.get(x.as_tensor()).cloned().unwrap();
            let hv = (g * &v)?
                .sum_all()?
                .backward()?
                .get(x.as_tensor())
                .cloned()
                .unwrap();
            Ok((hv - &numeric)?.abs()?.max_all()?.to_scalar::<f64>()?)
        })
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        assert!(err < 1e-6, "Hessian-vector product off by {err}");
        Ok(())
    }
}
