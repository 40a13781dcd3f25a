//! What the fused sublayer ops ([`super::encoder_block`], [`super::decoder_block`]) share: frozen
//! linears with optional LoRA factors read from one packed tensor, the activations a sublayer
//! keeps for its backward, and the op that runs a [`Sublayer`] in candle's graph.
//!
//! A sublayer composed from ops is four to eight graph nodes, each with a fresh output tensor, and
//! every edge of the graph costs candle's backward a zero-filled buffer and an addition into it,
//! on one thread while the other waits. A fused sublayer is one node: its input, and the LoRA
//! factors of its linears concatenated into one tensor (candle's `cat` hands each factor its
//! slice of the packed gradient). Inside, the same kernels as the single ops run on slices.

use std::sync::Mutex;

use rayon::prelude::*;

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType,
};

use super::quantized_linear::{quantized_product, QuantizedWeight};

use super::activation::GeluSlice;
use super::fused_attention::Elem;
use super::{cpu_slice, with_cpu_slices};

use super::frozen_linear::{frozen_product, frozen_product_onto, widened};
use super::lora_linear::{add_low_rank_onto, low_rank_grads, Mnkr};
use super::par_gemm::{matmul, matmul_acc, Strided};

/// A frozen linear `x W^T (+ b)` of a sublayer, as the model hands it over, with the LoRA term
/// `scale * (x A^T) B^T` when its linear is adapted.
#[derive(Clone, Copy)]
pub struct LinearSpec<'a> {
    pub w: FrozenWeight<'a>,
    pub b: Option<&'a Tensor>,
    /// `(A: [r, in], B: [out, r], scale)`.
    pub lora: Option<(&'a Tensor, &'a Tensor, f64)>,
}

/// A sublayer linear's frozen weight `W: [out, in]`: a dense tensor (f32/f64, or bf16/f16
/// widened per call), or quantized blocks (f32 inputs; QLoRA-style training).
#[derive(Clone, Copy)]
pub enum FrozenWeight<'a> {
    Dense(&'a Tensor),
    Quantized(&'a QuantizedWeight),
}

impl FrozenWeight<'_> {
    /// `(out, in)`.
    pub fn dims(&self) -> Result<(usize, usize)> {
        match self {
            Self::Dense(w) => w.dims2(),
            Self::Quantized(q) => Ok(q.dims()),
        }
    }
}

impl LinearSpec<'_> {
    /// Output features.
    pub fn out_features(&self) -> Result<usize> {
        Ok(self.w.dims()?.0)
    }

    /// Whether the fused op can take this linear for input `x`: frozen weight and bias of `x`'s
    /// dtype (or widened, or quantized blocks for f32), factors of `x`'s dtype, shapes that fit.
    pub(crate) fn fits(&self, x: &Tensor, inputs: usize) -> bool {
        let Ok((n, k)) = self.w.dims() else {
            return false;
        };
        let weight_ok = match self.w {
            FrozenWeight::Dense(w) => frozen_fits(w, x),
            FrozenWeight::Quantized(_) => x.device().is_cpu() && x.dtype() == DType::F32,
        };
        let same = |t: &Tensor| t.dtype() == x.dtype() && t.device().same_device(x.device());
        let bias_ok = self
            .b
            .is_none_or(|b| frozen_fits(b, x) && b.elem_count() == n);
        let lora_ok = self.lora.is_none_or(|(a, b, _)| {
            same(a)
                && same(b)
                && matches!((a.dims2(), b.dims2()), (Ok((r, ka)), Ok((nb, rb))) if ka == k && nb == n && rb == r)
        });
        k == inputs && weight_ok && bias_ok && lora_ok
    }
}

/// Whether a fused op can take `t` as a frozen tensor (weight, bias, norm parameter) for input
/// `x`: off the graph, on `x`'s device, in `x`'s dtype or bf16/f16 for f32 inputs (widened inside
/// the op for its duration, so a half-precision base keeps half the weight memory).
pub(crate) fn frozen_fits(t: &Tensor, x: &Tensor) -> bool {
    let dtype_ok = t.dtype() == x.dtype() || super::frozen_linear::widened_in_op(x, t);
    dtype_ok && t.device().same_device(x.device()) && !t.track_op()
}

/// An additive attention mask as a fused sublayer reads it (contiguous, cut from the graph), or
/// an error naming `op` where it does not broadcast to `[b, heads, t, t]`.
pub(crate) fn block_mask(op: &str, m: &Tensor, [b, heads, t]: [usize; 3]) -> Result<Tensor> {
    let fits = |m: usize, s: usize| m == s || m == 1;
    match m.dims4() {
        Ok((mb, mh, mq, mk)) if fits(mb, b) && fits(mh, heads) && fits(mq, t) && mk == t => {
            Ok(m.contiguous()?.detach())
        }
        _ => candle_core::bail!(
            "{op}: mask {:?} does not broadcast to [{b}, {heads}, {t}, {t}]",
            m.dims()
        ),
    }
}

/// A linear of a fused op: where its frozen tensors sit in the op's list, and its factors in the
/// packed tensor.
#[derive(Clone, Debug)]
pub(crate) struct BlockLinear {
    w: WeightAt,
    b: Option<usize>,
    n: usize,
    k: usize,
    lora: Option<Slot>,
}

/// Where a linear's weight is: an index into the frozen tensors, or its quantized blocks.
#[derive(Clone, Debug)]
enum WeightAt {
    Dense(usize),
    Quantized(QuantizedWeight),
}

/// Offsets of a linear's `A` and `B` in the packed factors, its rank and scale.
#[derive(Clone, Copy, Debug)]
struct Slot {
    a_at: usize,
    b_at: usize,
    r: usize,
    scale: f64,
}

/// The frozen tensors of a fused op (weights, biases, norm parameters, all contiguous) and the
/// packed LoRA factors of its linears.
pub(crate) struct Frozen {
    pub tensors: Vec<Tensor>,
    /// `A` and `B` of every adapted linear, flattened and concatenated; `None` without LoRA.
    pub pack: Option<Tensor>,
}

impl Frozen {
    pub fn new() -> Self {
        Self {
            tensors: vec![],
            pack: None,
        }
    }

    /// Index of a frozen tensor (made contiguous, cut from the graph) in the list.
    pub fn push(&mut self, t: &Tensor) -> Result<usize> {
        self.tensors.push(t.contiguous()?.detach());
        Ok(self.tensors.len() - 1)
    }

    /// Add the sublayer's linears in order; their factors go into the pack.
    ///
    /// The pack holds every `A` first, in the linears' order, then every `B`: the `A`s of
    /// linears that read the same input sit next to each other, one `[sum r, k]` matrix
    /// ([`shared_forward`]).
    pub fn linears(&mut self, specs: &[LinearSpec]) -> Result<Vec<BlockLinear>> {
        let (mut a_parts, mut b_parts) = (vec![], vec![]);
        let mut a_len = 0;
        for spec in specs {
            if let Some((a, _, _)) = spec.lora {
                a_len += a.elem_count();
            }
        }
        let (mut a_at, mut b_at) = (0, a_len);
        let mut out = vec![];
        for spec in specs {
            let (n, k) = spec.w.dims()?;
            let w = match spec.w {
                FrozenWeight::Dense(w) => WeightAt::Dense(self.push(w)?),
                FrozenWeight::Quantized(q) => WeightAt::Quantized(q.clone()),
            };
            let b = spec.b.map(|b| self.push(b)).transpose()?;
            let lora = match spec.lora {
                None => None,
                Some((a, bb, scale)) => {
                    let r = a.dim(0)?;
                    a_parts.push(a.flatten_all()?);
                    b_parts.push(bb.flatten_all()?);
                    let slot = Slot {
                        a_at,
                        b_at,
                        r,
                        scale,
                    };
                    a_at += r * k;
                    b_at += n * r;
                    Some(slot)
                }
            };
            out.push(BlockLinear { w, b, n, k, lora });
        }
        a_parts.extend(b_parts);
        self.pack = match a_parts.is_empty() {
            true => None,
            false => Some(Tensor::cat(&a_parts, 0)?.contiguous()?),
        };
        Ok(out)
    }
}

impl BlockLinear {
    pub fn has_lora(&self) -> bool {
        self.lora.is_some()
    }

    fn sizes(&self, m: usize) -> Mnkr {
        Mnkr {
            m,
            n: self.n,
            k: self.k,
            r: self.lora.map_or(0, |s| s.r),
        }
    }

    /// `x W^T (+ b) (+ scale (x A^T) B^T)` for `x: [m, k]`, added onto `residual` when given.
    pub fn forward<T: BlockElem>(
        &self,
        x: &[T],
        fz: &[&[T]],
        pack: &[T],
        residual: Option<&[T]>,
    ) -> Result<Vec<T>> {
        let m = x.len() / self.k.max(1);
        let b = self.b.map(|i| fz[i]);
        let mut out = match &self.w {
            WeightAt::Dense(w) => match residual {
                None => frozen_product(x, fz[*w], b, (m, self.n, self.k))?,
                Some(res) => frozen_product_onto(x, fz[*w], b, res, (m, self.n, self.k))?,
            },
            WeightAt::Quantized(q) => {
                let mut y = T::quantized_product(q, x, m, false)?;
                add_rows_onto(&mut y, b, residual);
                y
            }
        };
        if let Some(s) = self.lora {
            let (a, bb) = self.factors(pack, s);
            add_low_rank_onto(&mut out, [x, a, bb], self.sizes(m), s.scale)?;
        }
        Ok(out)
    }

    /// The frozen part `x W^T (+ b)`, without the LoRA term.
    fn base_forward<T: BlockElem>(&self, x: &[T], fz: &[&[T]]) -> Result<Vec<T>> {
        let m = x.len() / self.k.max(1);
        let b = self.b.map(|i| fz[i]);
        match &self.w {
            WeightAt::Dense(w) => frozen_product(x, fz[*w], b, (m, self.n, self.k)),
            WeightAt::Quantized(q) => {
                let mut y = T::quantized_product(q, x, m, false)?;
                add_rows_onto(&mut y, b, None);
                Ok(y)
            }
        }
    }

    /// The frozen part's input gradient `g W` added onto `dx`.
    fn base_backward<T: BlockElem>(&self, g: &[T], fz: &[&[T]], dx: &mut [T]) -> Result<()> {
        let m = g.len() / self.n.max(1);
        match &self.w {
            WeightAt::Dense(w) => {
                let (gv, wv) = (
                    Strided::row_major(g, 0, self.n),
                    Strided::row_major(fz[*w], 0, self.k),
                );
                matmul_acc(dx, (m, self.k, self.n), gv, wv, T::one())
            }
            WeightAt::Quantized(q) => {
                let part = T::quantized_product(q, g, m, true)?;
                add_rows_onto(dx, None, Some(&part));
                Ok(())
            }
        }
    }

    fn factors<'p, T>(&self, pack: &'p [T], s: Slot) -> (&'p [T], &'p [T]) {
        (
            &pack[s.a_at..s.a_at + s.r * self.k],
            &pack[s.b_at..s.b_at + self.n * s.r],
        )
    }

    /// For the output gradient `g: [m, n]` at input `x`: the input gradient added onto `dx` (or
    /// returned fresh when `dx` is `None`), the factors' gradients written into `dpack`.
    pub fn backward<T: BlockElem>(
        &self,
        g: &[T],
        x: &[T],
        fz: &[&[T]],
        pack: &[T],
        dpack: &mut [T],
        dx: Option<&mut [T]>,
    ) -> Result<Option<Vec<T>>> {
        let m = g.len() / self.n.max(1);
        let mut fresh = None;
        let dx = match (&self.w, dx) {
            (WeightAt::Dense(w), Some(dx)) => {
                let (gv, wv) = (
                    Strided::row_major(g, 0, self.n),
                    Strided::row_major(fz[*w], 0, self.k),
                );
                matmul_acc(dx, (m, self.k, self.n), gv, wv, T::one())?;
                dx
            }
            (WeightAt::Dense(w), None) => {
                let (gv, wv) = (
                    Strided::row_major(g, 0, self.n),
                    Strided::row_major(fz[*w], 0, self.k),
                );
                fresh
                    .insert(matmul((m, self.k, self.n), gv, wv)?)
                    .as_mut_slice()
            }
            (WeightAt::Quantized(q), Some(dx)) => {
                let part = T::quantized_product(q, g, m, true)?;
                add_rows_onto(dx, None, Some(&part));
                dx
            }
            (WeightAt::Quantized(q), None) => fresh
                .insert(T::quantized_product(q, g, m, true)?)
                .as_mut_slice(),
        };
        if let Some(s) = self.lora {
            let (a, bb) = self.factors(pack, s);
            let (da, db) = low_rank_grads([g, x, a, bb], self.sizes(m), s.scale, Some(dx))?;
            dpack[s.a_at..s.a_at + da.len()].copy_from_slice(&da);
            dpack[s.b_at..s.b_at + db.len()].copy_from_slice(&db);
        }
        Ok(fresh)
    }
}

/// An adapted linear of a group, its factors' slot and its first column in the stacked rank.
type Adapted<'l> = (&'l BlockLinear, Slot, usize);

/// The adapted linears among `ls` when their `A`s are one block of the pack (see
/// [`Frozen::linears`]): `(linear, slot, column offset)` and the total rank; `None` when they
/// are not adjacent.
fn adjacent_factors<'l>(ls: &[&'l BlockLinear]) -> Option<(Vec<Adapted<'l>>, usize)> {
    let mut out = vec![];
    let mut rank = 0;
    for &l in ls {
        if let Some(s) = l.lora {
            if let Some(&(p, ps, _)) = out.last() {
                let (p, ps): (&BlockLinear, Slot) = (p, ps);
                if ps.a_at + ps.r * p.k != s.a_at || p.k != l.k {
                    return None;
                }
            }
            out.push((l, s, rank));
            rank += s.r;
        }
    }
    Some((out, rank))
}

/// `x W_i^T (+ b_i) (+ scale_i (x A_i^T) B_i^T)` for linears `ls` that read the same input `x`:
/// the rank bottlenecks `x [A_1; A_2; ...]^T` of the adapted ones come from one product, not
/// one thin product each.
pub(crate) fn shared_forward<T: BlockElem>(
    ls: &[&BlockLinear],
    x: &[T],
    c: &Ctx<T>,
) -> Result<Vec<Vec<T>>> {
    let Some((adapted, rank)) = adjacent_factors(ls).filter(|(a, _)| a.len() > 1) else {
        return ls
            .iter()
            .map(|l| l.forward(x, c.fz, c.pack, None))
            .collect();
    };
    let mut outs = ls
        .iter()
        .map(|l| l.base_forward(x, c.fz))
        .collect::<Result<Vec<_>>>()?;
    let (k, first) = (adapted[0].0.k, adapted[0].1.a_at);
    let m = x.len() / k.max(1);
    // z = x [A_1; A_2; ...]^T: [m, rank].
    let z = matmul(
        (m, rank, k),
        Strided::row_major(x, 0, k),
        Strided::transposed(c.pack, first, k),
    )?;
    for (out, l) in outs.iter_mut().zip(ls) {
        let Some(&(_, s, col)) = adapted.iter().find(|(a, _, _)| std::ptr::eq(*a, *l)) else {
            continue;
        };
        let b = &c.pack[s.b_at..s.b_at + l.n * s.r];
        matmul_acc(
            out,
            (m, l.n, s.r),
            Strided::row_major(&z, col, rank),
            Strided::transposed(b, 0, s.r),
            T::from_f64(s.scale),
        )?;
    }
    Ok(outs)
}

/// The outputs of a [`shared_forward`] over three linears.
pub(crate) fn three<T>(v: Vec<Vec<T>>) -> Result<[Vec<T>; 3]> {
    v.try_into()
        .map_err(|_| candle_core::Error::Msg("fused sublayer: expected 3 outputs".into()))
}

/// The outputs of a [`shared_forward`] over two linears.
pub(crate) fn two<T>(v: Vec<Vec<T>>) -> Result<[Vec<T>; 2]> {
    v.try_into()
        .map_err(|_| candle_core::Error::Msg("fused sublayer: expected 2 outputs".into()))
}

/// The input gradient of [`shared_forward`] for output gradients `gs`, added onto `dx` (or
/// returned fresh when `dx` is `None`); the factors' gradients written into `dpack`. The
/// adapted linears' bottleneck gradients are stacked, so `dA`, the recomputed bottleneck and
/// the low-rank input gradient are one product each.
pub(crate) fn shared_backward<T: BlockElem>(
    ls: &[&BlockLinear],
    gs: &[&[T]],
    x: &[T],
    c: &Ctx<T>,
    dpack: &mut [T],
    dx: Option<&mut [T]>,
) -> Result<Option<Vec<T>>> {
    let k = ls.first().map_or(0, |l| l.k);
    let m = x.len() / k.max(1);
    let mut fresh = None;
    let dx = match dx {
        Some(dx) => dx,
        None => fresh.insert(vec![T::zero(); m * k]).as_mut_slice(),
    };
    let Some((adapted, rank)) = adjacent_factors(ls).filter(|(a, _)| a.len() > 1) else {
        for (l, g) in ls.iter().zip(gs) {
            l.backward(g, x, c.fz, c.pack, dpack, Some(&mut *dx))?;
        }
        return Ok(fresh);
    };
    for (l, g) in ls.iter().zip(gs) {
        l.base_backward(g, c.fz, dx)?;
    }
    let first = adapted[0].1.a_at;
    let x_view = Strided::row_major(x, 0, k);
    // gb = [scale_1 g_1 B_1, scale_2 g_2 B_2, ...]: [m, rank]. Each linear's products here are
    // too small for par_gemm to split (one thread each), so the linears' run side by side.
    let grads: Vec<_> = adapted
        .iter()
        .map(|&(l, s, col)| {
            let i = ls.iter().position(|x| std::ptr::eq(*x, l)).unwrap_or(0);
            (i, l, s, col)
        })
        .collect();
    let parts = grads
        .par_iter()
        .map(|&(i, l, s, _)| {
            let b = &c.pack[s.b_at..s.b_at + l.n * s.r];
            matmul(
                (m, s.r, l.n),
                Strided::row_major(gs[i], 0, l.n),
                Strided::row_major(b, 0, s.r),
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let mut gb = vec![T::zero(); m * rank];
    for (&(_, _, s, col), part) in grads.iter().zip(&parts) {
        let sc = T::from_f64(s.scale);
        for (row, src) in gb.chunks_exact_mut(rank).zip(part.chunks_exact(s.r)) {
            row[col..col + s.r]
                .iter_mut()
                .zip(src)
                .for_each(|(d, &v)| *d = v * sc);
        }
    }
    // dx += gb [A_1; A_2; ...].
    matmul_acc(
        dx,
        (m, k, rank),
        Strided::row_major(&gb, 0, rank),
        Strided::row_major(c.pack, first, k),
        T::one(),
    )?;
    // d[A_1; A_2; ...] = gb^T x, one block of the pack.
    let da = matmul((rank, k, m), Strided::transposed(&gb, 0, rank), x_view)?;
    dpack[first..first + da.len()].copy_from_slice(&da);
    // dB_i = scale_i g_i^T (x A_i^T), the bottlenecks recomputed together.
    let z = matmul((m, rank, k), x_view, Strided::transposed(c.pack, first, k))?;
    let dbs = grads
        .par_iter()
        .map(|&(i, l, s, col)| {
            matmul(
                (l.n, s.r, m),
                Strided::transposed(gs[i], 0, l.n),
                Strided::row_major(&z, col, rank),
            )
        })
        .collect::<Result<Vec<_>>>()?;
    for ((_, _, s, _), db) in grads.into_iter().zip(dbs) {
        let sc = T::from_f64(s.scale);
        dpack[s.b_at..s.b_at + db.len()]
            .iter_mut()
            .zip(&db)
            .for_each(|(d, &v)| *d = v * sc);
    }
    Ok(fresh)
}

/// Activations a fused op keeps from its forward for its backward.
#[derive(Default)]
pub(crate) struct Kept(Mutex<Vec<CpuStorage>>);

impl Kept {
    pub fn keep<T: WithDType>(&self, vs: Vec<Vec<T>>) {
        let mut kept = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *kept = vs.into_iter().map(T::to_cpu_storage_owned).collect();
    }

    /// `f` over the kept activations, in the order they were kept.
    pub fn with<T: WithDType, R>(&self, f: impl FnOnce(&[&[T]]) -> Result<R>) -> Result<R> {
        let kept = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if kept.is_empty() {
            candle_core::bail!("fused sublayer: backward before forward");
        }
        let slices = kept
            .iter()
            .map(|s| s.as_slice::<T>())
            .collect::<Result<Vec<_>>>()?;
        f(&slices)
    }
}

/// The element types fused sublayers run on (f32, f64).
pub(crate) trait BlockElem: Elem + GeluSlice {
    /// `x W^T` (`x: [m, in]`) or, `transposed`, `x W` (`x: [m, out]`) on quantized blocks.
    fn quantized_product(
        w: &QuantizedWeight,
        x: &[Self],
        m: usize,
        transposed: bool,
    ) -> Result<Vec<Self>>;
}

impl BlockElem for f32 {
    fn quantized_product(
        w: &QuantizedWeight,
        x: &[f32],
        m: usize,
        transposed: bool,
    ) -> Result<Vec<f32>> {
        quantized_product(w, x, m, transposed)
    }
}

impl BlockElem for f64 {
    fn quantized_product(_: &QuantizedWeight, _: &[f64], _: usize, _: bool) -> Result<Vec<f64>> {
        // `LinearSpec::fits` admits quantized weights for f32 inputs only.
        candle_core::bail!("fused sublayer: quantized weights take f32 inputs")
    }
}

/// `out[i] += bias[i % bias.len()] + add[i]` on the threads, for the terms given.
pub(crate) fn add_rows_onto<T: WithDType>(out: &mut [T], bias: Option<&[T]>, add: Option<&[T]>) {
    let width = bias.map_or(1, |b| b.len().max(1));
    // Whole rows per chunk, so a chunk's bias offsets start at 0.
    let chunk = ((1 << 14) / width).max(1) * width;
    out.par_chunks_mut(chunk).enumerate().for_each(|(c, o)| {
        let at = c * chunk;
        if let Some(b) = bias {
            o.iter_mut()
                .zip(b.iter().cycle())
                .for_each(|(o, &b)| *o += b);
        }
        if let Some(a) = add {
            o.iter_mut().zip(&a[at..]).for_each(|(o, &a)| *o += a);
        }
    });
}

/// What a sublayer's kernels see: the frozen tensors' data, the packed factors, the linears.
pub(crate) struct Ctx<'a, T> {
    pub fz: &'a [&'a [T]],
    pub pack: &'a [T],
    pub l: &'a [BlockLinear],
}

/// One kind of fused sublayer, over slices.
pub(crate) trait Sublayer: Send + Sync + 'static {
    const NAME: &'static str;

    /// The output for the input `x` (same shape), and the activations to keep for the backward.
    fn forward<T: BlockElem>(&self, x: &[T], c: &Ctx<T>) -> Result<(Vec<T>, Vec<Vec<T>>)>;

    /// The input gradient for the output gradient `g`; the factors' gradients go into `dpack`.
    fn backward<T: BlockElem>(
        &self,
        g: &[T],
        x: &[T],
        kept: &[&[T]],
        c: &Ctx<T>,
        dpack: &mut [T],
    ) -> Result<Vec<T>>;
}

/// A [`Sublayer`] as one node of candle's graph: input `x`, and the packed LoRA factors when
/// there are any.
pub(crate) struct FusedSublayer<S> {
    kind: S,
    linears: Vec<BlockLinear>,
    frozen: Vec<Tensor>,
    kept: Kept,
}

/// Run sublayer `make(indices of extra)` on `x` with `linears`; `extra` are further frozen
/// tensors (norm parameters, RoPE tables) the sublayer reads by index.
pub(crate) fn apply<S: Sublayer>(
    x: &Tensor,
    linears: &[LinearSpec],
    extra: &[&Tensor],
    make: impl FnOnce(&[usize]) -> S,
) -> Result<Tensor> {
    let mut frozen = Frozen::new();
    let linears = frozen.linears(linears)?;
    let at = extra
        .iter()
        .map(|t| frozen.push(t))
        .collect::<Result<Vec<_>>>()?;
    let op = FusedSublayer {
        kind: make(&at),
        linears,
        frozen: frozen.tensors,
        kept: Kept::default(),
    };
    let x = x.contiguous()?;
    match frozen.pack {
        Some(pack) => x.apply_op2(&pack, op),
        None => x.apply_op1(op),
    }
}

impl<S: Sublayer> FusedSublayer<S> {
    /// The frozen tensors in the compute dtype: half-precision ones widened for this call only.
    fn frozen(&self) -> Result<Vec<Tensor>> {
        self.frozen.iter().map(widened).collect()
    }

    fn forward<T: BlockElem>(&self, x: &[T], pack: &[T]) -> Result<Vec<T>> {
        let frozen = self.frozen()?;
        let frozen: Vec<&Tensor> = frozen.iter().collect();
        with_cpu_slices::<T, _>(&frozen, |fz| {
            let c = Ctx {
                fz,
                pack,
                l: &self.linears,
            };
            let (y, kept) = self.kind.forward(x, &c)?;
            self.kept.keep(kept);
            Ok(y)
        })
    }

    /// `(dx, dpack)` for the output gradient `g`.
    fn grads<T: BlockElem>(
        &self,
        x: &Tensor,
        pack: Option<&Tensor>,
        g: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let g = g.contiguous()?;
        let ts: Vec<&Tensor> = [&g, x].into_iter().chain(pack).collect();
        let frozen = self.frozen()?;
        let frozen: Vec<&Tensor> = frozen.iter().collect();
        with_cpu_slices::<T, _>(&ts, |s| {
            let pack_values = s.get(2).copied().unwrap_or(&[]);
            let (dx, dpack) = with_cpu_slices::<T, _>(&frozen, |fz| {
                self.kept.with::<T, _>(|kept| {
                    let c = Ctx {
                        fz,
                        pack: pack_values,
                        l: &self.linears,
                    };
                    let mut dpack = vec![T::zero(); pack_values.len()];
                    let dx = self.kind.backward(s[0], s[1], kept, &c, &mut dpack)?;
                    Ok((dx, dpack))
                })
            })?;
            let dx = Tensor::from_vec(dx, x.shape(), x.device())?;
            let dpack = pack
                .map(|p| Tensor::from_vec(dpack, p.shape(), p.device()))
                .transpose()?;
            Ok((dx, dpack))
        })
    }

    fn cpu_forward(
        &self,
        x: (&CpuStorage, &Layout),
        pack: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let out = match x.0 {
            CpuStorage::F32(_) => {
                let p = pack.map(|(s, l)| cpu_slice::<f32>(s, l)).transpose()?;
                CpuStorage::F32(self.forward(cpu_slice(x.0, x.1)?, p.unwrap_or(&[]))?)
            }
            CpuStorage::F64(_) => {
                let p = pack.map(|(s, l)| cpu_slice::<f64>(s, l)).transpose()?;
                CpuStorage::F64(self.forward(cpu_slice(x.0, x.1)?, p.unwrap_or(&[]))?)
            }
            _ => candle_core::bail!("{}: f32 or f64 only", S::NAME),
        };
        Ok((out, x.1.shape().clone()))
    }

    fn tensor_grads(
        &self,
        x: &Tensor,
        pack: Option<&Tensor>,
        g: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>)> {
        match x.dtype() {
            candle_core::DType::F32 => self.grads::<f32>(x, pack, g),
            candle_core::DType::F64 => self.grads::<f64>(x, pack, g),
            dt => candle_core::bail!("{}: {dt:?} gradients", S::NAME),
        }
    }
}

impl<S: Sublayer> CustomOp1 for FusedSublayer<S> {
    fn name(&self) -> &'static str {
        S::NAME
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu_forward((s, l), None)
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        if !x.track_op() {
            return Ok(None);
        }
        Ok(Some(self.tensor_grads(x, None, g)?.0))
    }
}

impl<S: Sublayer> CustomOp2 for FusedSublayer<S> {
    fn name(&self) -> &'static str {
        S::NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu_forward((s1, l1), Some((s2, l2)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        pack: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dpack) = self.tensor_grads(x, Some(pack), g)?;
        Ok((
            x.track_op().then_some(dx),
            dpack.filter(|_| pack.track_op()),
        ))
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use super::{FrozenWeight, LinearSpec};
    use candle_core::{Result, Tensor};

    /// A sublayer linear composed from candle ops: `x W^T + b + scale (x A^T) B^T`, the
    /// reference the fused sublayers are tested against.
    pub(crate) fn composed_linear(x: &Tensor, s: &LinearSpec) -> Result<Tensor> {
        let FrozenWeight::Dense(w) = s.w else {
            panic!("composed_linear: a dense weight")
        };
        let mut y = x.broadcast_matmul(&w.t()?)?;
        if let Some(b) = s.b {
            y = y.broadcast_add(b)?;
        }
        if let Some((a, b, scale)) = s.lora {
            y = (y + (x.broadcast_matmul(&a.t()?)?.broadcast_matmul(&b.t()?)? * scale)?)?;
        }
        Ok(y)
    }
}
