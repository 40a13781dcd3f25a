//! Kernels with a real backward.
//!
//! candle's fused `softmax_last_dim`, `rms_norm`, `layer_norm` and `rope*` record no backward op, so
//! gradients through them are silently dropped, and its matmul backward always computes the weight
//! gradient. Every op here has a fused CPU forward (f32 and f64) and a backward written with
//! differentiable tensor ops, so first-order *and* second-order gradients (MAML) are right. Where
//! no graph of the gradients is kept (`meta::second_order::keeps_grad_graph` false), several take
//! a faster first-order backward straight from the storages (norms, activations, attention, the
//! low-rank add, trained linears). On other devices and dtypes the same maths runs as a
//! composition of candle ops. Each op has a finite-difference test in f64 next to it.

pub mod activation;
pub mod attention;
pub mod checkpoint;
pub mod cross_entropy;
pub mod decoder_block;
pub mod encoder_block;
pub(crate) mod exp;
pub mod frozen_linear;
pub mod fused_attention;
pub(crate) mod fused_block;
pub mod gradcheck;
pub mod layer_norm;
pub mod lm_head_loss;
pub mod lora_linear;
pub mod low_rank;
pub(crate) mod matvec;
pub(crate) mod norm_grad;
pub(crate) mod panel_gemm;
pub(crate) mod par_gemm;
pub mod quantized_linear;
pub(crate) mod reduce;
pub mod residual_linear;
pub mod rms_norm;
pub mod rope;
pub mod softmax;

pub use activation::{gelu, silu, swiglu};
pub use attention::{attention, causal_mask, padding_mask};
pub use checkpoint::backward;
pub use cross_entropy::cross_entropy;
pub use decoder_block::{decoder_attention, decoder_mlp, Heads, RmsNormSpec};
pub use encoder_block::{encoder_attention, encoder_ffn, LayerNormSpec};
pub use frozen_linear::{frozen_linear, linear};
pub use fused_attention::attention_heads;
pub use fused_block::{FrozenWeight, LinearSpec};
pub use layer_norm::layer_norm;
pub use lm_head_loss::{lm_head_cross_entropy, quantized_lm_head_cross_entropy};
pub use lora_linear::lora_linear;
pub use low_rank::add_low_rank;
pub use quantized_linear::{
    quantized_linear, quantized_linear_exact, quantized_logits, with_integer_kernels,
    QuantizedWeight,
};
pub use residual_linear::{gelu_linear_residual, linear_residual, swiglu_linear_residual};
pub use rms_norm::rms_norm;
pub use rope::{rope, RopeTables};
pub use softmax::softmax_last_dim;

use candle_core::{bail, CpuStorage, DType, Layout, Result, Tensor, WithDType};

/// Whether the fused CPU kernels handle this tensor (everything else takes the composed path).
pub(crate) fn fused_ok(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64)
}

/// Whether a fused first-order backward may run straight from the storages of `ts`: all CPU
/// f32/f64 of one dtype, and no graph of the gradients is being kept (second-order MAML needs
/// the composed, differentiable backward).
pub(crate) fn first_order_fused(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| fused_ok(t) && t.dtype() == ts[0].dtype())
        && !crate::meta::second_order::keeps_grad_graph()
}

/// The contiguous CPU data of each tensor (copied first where not contiguous), handed to `f`.
pub(crate) fn with_cpu_slices<T: WithDType, R>(
    ts: &[&Tensor],
    f: impl FnOnce(&[&[T]]) -> Result<R>,
) -> Result<R> {
    let owned: Vec<Tensor> = ts.iter().map(|t| t.contiguous()).collect::<Result<_>>()?;
    let guards: Vec<_> = owned.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(ts.len());
    for (s, l) in &guards {
        let candle_core::Storage::Cpu(s) = &**s else {
            bail!("fused backward: CPU tensors only");
        };
        slices.push(cpu_slice::<T>(s, l)?);
    }
    f(&slices)
}

/// The contiguous data of a CPU storage as a slice.
pub(crate) fn cpu_slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let data = s.as_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("fused kernel given a non-contiguous tensor"),
    }
}

/// `s` as f32 values when `T` is `f32` (generic kernels handing f32 data to f32-only ones).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) fn as_f32<T: 'static>(s: &[T]) -> Option<&[f32]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        // SAFETY: T is f32.
        .then(|| unsafe { std::slice::from_raw_parts(s.as_ptr() as *const f32, s.len()) })
}

/// [`as_f32`] for a mutable slice.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) fn as_f32_mut<T: 'static>(s: &mut [T]) -> Option<&mut [f32]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        // SAFETY: T is f32.
        .then(|| unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr() as *mut f32, s.len()) })
}

/// A copy of `src` made `chunk` elements per task on the threads, each chunk then passed to
/// `then`; no serial zero-fill of the new buffer first (calloc's memset of a few MB runs on one
/// thread while the other waits).
pub(crate) fn par_copy<T: WithDType>(
    src: &[T],
    chunk: usize,
    then: impl Fn(&mut [T]) + Sync,
) -> Vec<T> {
    use rayon::prelude::*;
    let mut out: Vec<T> = Vec::with_capacity(src.len());
    out.spare_capacity_mut()[..src.len()]
        .par_chunks_mut(chunk.max(1))
        .zip(src.par_chunks(chunk.max(1)))
        .for_each(|(o, s)| {
            // SAFETY: `o` and `s` are chunks at the same place of equal-length slices, so of the
            // same length; after the copy every element of `o` is initialised.
            let o = unsafe {
                std::ptr::copy_nonoverlapping(s.as_ptr(), o.as_mut_ptr() as *mut T, s.len());
                std::slice::from_raw_parts_mut(o.as_mut_ptr() as *mut T, s.len())
            };
            then(o);
        });
    // SAFETY: every element was written by the copy above.
    unsafe { out.set_len(src.len()) };
    out
}

/// A new vector of `n` values made `chunk` at a time on the threads: chunk `i` (values from
/// `i * chunk`, the last chunk shorter) is written from the iterator `values(i)`, which must yield
/// exactly as many values (checked), then handed to `then(i, chunk)` to be finished in place.
/// Like [`par_copy`], nothing is zero-filled first: kernels' outputs zeroed and then overwritten
/// were ~1.4% of a forward pass's samples (`perf`, memset).
pub(crate) fn par_fill<T: WithDType, I: Iterator<Item = T>>(
    n: usize,
    chunk: usize,
    values: impl Fn(usize) -> I + Sync,
    then: impl Fn(usize, &mut [T]) + Sync,
) -> Vec<T> {
    use rayon::prelude::*;
    let chunk = chunk.max(1);
    let mut out: Vec<T> = Vec::with_capacity(n);
    out.spare_capacity_mut()[..n]
        .par_chunks_mut(chunk)
        .with_min_len(rows_per_task(chunk))
        .enumerate()
        .for_each(|(i, o)| {
            let mut written = 0;
            for (slot, v) in o.iter_mut().zip(values(i)) {
                slot.write(v);
                written += 1;
            }
            assert_eq!(written, o.len(), "par_fill: chunk {i} given too few values");
            // SAFETY: all `o.len()` elements were written just above.
            let o = unsafe { std::slice::from_raw_parts_mut(o.as_mut_ptr() as *mut T, o.len()) };
            then(i, o);
        });
    // SAFETY: every chunk was written in full (asserted above) or the loop panicked.
    unsafe { out.set_len(n) };
    out
}

/// Chunk `i` of `chunk` values of `s` (the last one shorter; empty past the end).
pub(crate) fn chunk_of<T>(s: &[T], chunk: usize, i: usize) -> &[T] {
    s.chunks(chunk.max(1)).nth(i).unwrap_or_default()
}

/// Rows handed to one rayon task: enough work to amortise scheduling.
pub(crate) fn rows_per_task(dim: usize) -> usize {
    (16384 / dim.max(1)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn par_fill_writes_every_chunk_and_refuses_a_short_one() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        for (len, chunk) in [(0, 4), (10, 4), (100_003, 1000), (7, 100)] {
            let src: Vec<f32> = (0..len).map(|i| i as f32).collect();
            let out = pool.install(|| {
                par_fill(
                    len,
                    chunk,
                    |i| chunk_of(&src, chunk, i).iter().map(|v| v * 2.0),
                    |i, o| o[0] += (i * chunk) as f32,
                )
            });
            let want: Vec<f32> = (0..len)
                .map(|i| {
                    if i % chunk == 0 {
                        3.0 * i as f32
                    } else {
                        2.0 * i as f32
                    }
                })
                .collect();
            assert_eq!(out, want, "{len} values in chunks of {chunk}");
        }
        let short = std::panic::catch_unwind(|| {
            par_fill(
                10,
                4,
                |i| std::iter::repeat_n(1f32, if i == 2 { 1 } else { 4 }),
                |_, _| {},
            )
        });
        assert!(
            short.is_err(),
            "a chunk given too few values must not be left unwritten"
        );
    }

    #[test]
    fn par_copy_copies_every_chunk_and_applies_then() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        for (len, chunk) in [(0, 4), (10, 4), (100_003, 1000), (7, 100)] {
            let src: Vec<f32> = (0..len).map(|i| i as f32).collect();
            let out =
                pool.install(|| par_copy(&src, chunk, |c| c.iter_mut().for_each(|v| *v += 1.0)));
            assert_eq!(out.len(), len);
            assert!(
                out.iter().zip(&src).all(|(o, s)| *o == s + 1.0),
                "len {len} chunk {chunk}"
            );
        }
    }
}
