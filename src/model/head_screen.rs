//! The greedy next token of a dense (f32, bf16 or f16, row-major or in f32 panels) LM head
//! without reading all of it.
//!
//! A decode step is bound by reading the weights once, and the tied head of SmolLM2-135M
//! (49152 x 576) is a fifth of those bytes in f32. Greedy decoding needs only the argmax, so a
//! Q8_0 copy of the head (a quarter of the bytes, integer kernels) scores every row, and only the
//! rows that can still be the argmax are computed exactly.
//!
//! The bound is rigorous. With `x` the normed hidden state, `x'` its 8-bit blocks, `w` a row and
//! `w'` its Q8_0 copy, `x.w - x'.w' = x.(w - w') + (x - x').w'`, so by Cauchy-Schwarz row `j`'s
//! screen score `s_j` is within `e_j = |x| |w_j - w'_j| + |x - x'| |w'_j|` of its exact logit
//! (the two row norms are measured when the copy is made), plus a floating-point allowance. The
//! largest logit is at least `L = max_j (s_j - e_j)`, so a row with `s_j + e_j < L` cannot hold
//! it: the token is exactly the argmax of the full head, ties included. Sampling and
//! log-probabilities need every logit and keep the full head.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Tensor, TensorId};
use rayon::prelude::*;

use crate::ops::QuantizedWeight;
use crate::quant::{q8_input_error_norm, Q8Block, QKind, QWeight, BLOCK};
use crate::Result;

/// Rows `start..start + len` of a dense head in f32, for [`HeadScreen::build`].
fn tensor_rows(head: &Tensor) -> impl Fn(usize, usize) -> Result<Vec<f32>> + Sync + '_ {
    |start, len| {
        Ok(head
            .narrow(0, start, len)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    }
}

/// Which head a screen was made from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum HeadId {
    Tensor(TensorId),
    /// [`QuantizedWeight::id`].
    Panels(u64),
}

/// A head's Q8_0 copy and the constants of its error bound.
pub(crate) struct HeadScreen {
    pub(crate) q: QWeight,
    /// `|w_j - w'_j|` per row (Euclidean), rounded up.
    err: Vec<f32>,
    /// `|w'_j|` per row, rounded up.
    norm: Vec<f32>,
}

/// Rows per parallel task while making a screen.
const CHUNK_ROWS: usize = 1024;

/// `METAPEFT_HEAD_SCREEN=0` computes every logit of greedy steps too (A/B timing).
pub(crate) fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("METAPEFT_HEAD_SCREEN").map_or(true, |v| v != "0"))
}

impl HeadScreen {
    /// The screen of `head` (`[n, k]`, f32/bf16/f16), made once per head tensor: generation
    /// builds a decoder per call (evaluation generates hundreds of times with the same head).
    /// The last screen made is kept, holding a quarter of the head's f32 bytes.
    pub(crate) fn of(head: &Tensor) -> Result<Option<Arc<Self>>> {
        Self::cached(HeadId::Tensor(head.id()), head.dims2()?, tensor_rows(head))
    }

    /// [`Self::of`] for a head kept as f32 panels (the inference layout).
    pub(crate) fn of_panels(head: &QuantizedWeight) -> Result<Option<Arc<Self>>> {
        Self::cached(HeadId::Panels(head.id()), head.dims(), |start, len| {
            let mut rows = vec![0f32; len * head.dims().1];
            head.dequantize_rows_serial(start, len, &mut rows)?;
            Ok(rows)
        })
    }

    /// The last screen made if it is `id`'s, else a new one from `rows(start, len)` (the head's
    /// rows `start..start + len` in f32), kept as the last.
    fn cached(
        id: HeadId,
        dims: (usize, usize),
        rows: impl Fn(usize, usize) -> Result<Vec<f32>> + Sync,
    ) -> Result<Option<Arc<Self>>> {
        static LAST: Mutex<Option<(HeadId, Arc<HeadScreen>)>> = Mutex::new(None);
        let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((last_id, s)) = last.as_ref() {
            if *last_id == id {
                return Ok(Some(s.clone()));
            }
        }
        let Some(s) = Self::build(dims, rows)? else {
            return Ok(None);
        };
        let s = Arc::new(s);
        *last = Some((id, s.clone()));
        Ok(Some(s))
    }

    /// `None` for rows that are not whole Q8_0 blocks.
    fn build(
        (n, k): (usize, usize),
        rows: impl Fn(usize, usize) -> Result<Vec<f32>> + Sync,
    ) -> Result<Option<Self>> {
        if !k.is_multiple_of(BLOCK) || n == 0 {
            return Ok(None);
        }
        let bb = QKind::Q8_0.block_bytes();
        let row_bytes = k / BLOCK * bb;
        let up = |v: f64| (v.sqrt() * (1.0 + 1e-6)) as f32;
        type Chunk = (Vec<u8>, Vec<f32>, Vec<f32>);
        let chunks: Vec<Chunk> = (0..n.div_ceil(CHUNK_ROWS))
            .into_par_iter()
            .map(|c| -> Result<Chunk> {
                let (start, len) = (c * CHUNK_ROWS, CHUNK_ROWS.min(n - c * CHUNK_ROWS));
                let w = rows(start, len)?;
                let mut bytes = Vec::with_capacity(len * row_bytes);
                let (mut errs, mut norms) = (Vec::with_capacity(len), Vec::with_capacity(len));
                for row in w.chunks_exact(k) {
                    let (mut err2, mut norm2) = (0f64, 0f64);
                    for b in row.chunks_exact(BLOCK) {
                        let amax = b.iter().fold(0f32, |a, v| a.max(v.abs()));
                        let d = half::f16::from_f32(amax / 127.0);
                        let df = d.to_f32();
                        let inv = if df > 0.0 { 1.0 / df } else { 0.0 };
                        bytes.extend_from_slice(&d.to_bits().to_le_bytes());
                        for &v in b {
                            let q = (v * inv).round().clamp(-127.0, 127.0) as i8;
                            bytes.push(q as u8);
                            // The copy's element, exactly as the kernels read it.
                            let wq = df * q as f32;
                            err2 += (v as f64 - wq as f64).powi(2);
                            norm2 += (wq as f64).powi(2);
                        }
                    }
                    errs.push(up(err2));
                    norms.push(up(norm2));
                }
                Ok((bytes, errs, norms))
            })
            .collect::<Result<_>>()?;
        let mut bytes = Vec::with_capacity(n * row_bytes);
        let (mut err, mut norm) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for (b, e, m) in chunks {
            bytes.extend_from_slice(&b);
            err.extend(e);
            norm.extend(m);
        }
        Ok(Some(Self {
            q: QWeight::from_bytes(QKind::Q8_0, n, k, bytes)?,
            err,
            norm,
        }))
    }

    /// The rows that may hold the largest logit, given the screen `scores` of input `x` (f32)
    /// quantized to `xq`, in increasing order; `None` when the scores are not finite.
    pub(crate) fn candidates(
        &self,
        scores: &[f32],
        x: &[f32],
        xq: &[Q8Block],
    ) -> Option<Vec<usize>> {
        let x_norm = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt() as f32;
        let r_norm = q8_input_error_norm(x, xq) as f32;
        // Rounding in the f32 sums on both sides: each is below 1e-4 of |x| |w| for rows of up
        // to ~10^5 elements (n * 2^-24 per sum), with |w| <= |w'| + |w - w'|.
        let slack = 1e-4 * (x_norm + r_norm);
        let bound = |j: usize| {
            x_norm * self.err[j] + r_norm * self.norm[j] + slack * (self.norm[j] + self.err[j])
        };
        let lowest_max = (0..scores.len())
            .map(|j| scores[j] - bound(j))
            .fold(f32::NEG_INFINITY, f32::max);
        if !lowest_max.is_finite() || scores.iter().any(|s| !s.is_finite()) {
            return None;
        }
        Some(
            (0..scores.len())
                .filter(|&j| scores[j] + bound(j) >= lowest_max)
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{q8_input_error_norm, quantize_input};
    use candle_core::Device;

    fn randn(n: usize, k: usize, seed: u64, scale: f64) -> Result<Tensor> {
        Ok(crate::ops::gradcheck::randn_f64(&[n, k], seed, scale)?.to_dtype(DType::F32)?)
    }

    /// Every row's screen score is within its bound of its exact logit, the argmax row is always
    /// a candidate, and so are rows with near-equal logits.
    #[test]
    fn the_bound_holds_and_keeps_the_argmax() -> Result<()> {
        let (n, k) = (300, 96);
        let mut head = randn(n, k, 1, 0.1)?;
        // Near-ties: row 7 a hair above row 3; row 11 equal to row 3.
        let mut rows = head.to_vec2::<f32>()?;
        rows[7] = rows[3].iter().map(|v| v * 1.000_01).collect();
        rows[11] = rows[3].clone();
        head = Tensor::new(rows.clone(), &Device::Cpu)?;
        let screen = HeadScreen::build(head.dims2()?, tensor_rows(&head))?.expect("whole blocks");
        for seed in 0..20u64 {
            let mut x = randn(1, k, 100 + seed, 3.0)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            if seed % 2 == 0 {
                // Point x along row 3 so that 3, 7 and 11 lead.
                x.iter_mut().zip(&rows[3]).for_each(|(v, w)| *v += 40.0 * w);
            }
            let mut xq = vec![];
            quantize_input(&x, &mut xq);
            let mut scores = vec![0f32; n];
            screen.q.dot_rows(&xq, 0..n, &mut scores);
            let exact: Vec<f32> = rows
                .iter()
                .map(|w| w.iter().zip(&x).map(|(a, b)| a * b).sum())
                .collect();
            let keep = screen.candidates(&scores, &x, &xq).expect("finite");
            let x_norm = x.iter().map(|v| v * v).sum::<f32>().sqrt();
            let r_norm = q8_input_error_norm(&x, &xq) as f32;
            for (j, (s, e)) in scores.iter().zip(&exact).enumerate() {
                let bound = x_norm * screen.err[j] + r_norm * screen.norm[j];
                assert!(
                    (s - e).abs() <= bound,
                    "seed {seed} row {j}: screen {s} exact {e}, bound {bound}"
                );
            }
            let best = crate::generate::argmax(&exact) as usize;
            assert!(
                keep.contains(&best),
                "seed {seed}: the argmax row {best} was screened out"
            );
            assert!(
                keep.len() < n / 4,
                "seed {seed}: {} of {n} rows kept",
                keep.len()
            );
            if seed % 2 == 0 {
                assert_eq!(best, 7, "seed {seed}");
                assert!(
                    keep.contains(&3) && keep.contains(&11),
                    "seed {seed}: near-ties kept"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn rows_of_partial_blocks_have_no_screen() -> Result<()> {
        assert!(HeadScreen::build((4, 40), tensor_rows(&randn(4, 40, 2, 1.0)?))?.is_none());
        Ok(())
    }
}
