//! A pre-norm decoder layer's two sublayers (Llama, Qwen2) as one op each, first order:
//! attention `h + attn(rope(q(n)), rope(k(n)), v(n)) Wo^T` and MLP
//! `h + swiglu(gate(n), up(n)) Wdown^T`, with `n = rmsnorm(h)`, any of their linears with a LoRA
//! term (see [`super::fused_block`] for why). The attention op keeps the normed input, the rotated
//! q and k, v and the attention output; the MLP op the normed input, gate and up: what the
//! composed ops keep. The backward recomputes SwiGLU and the rank-`r` bottlenecks. `None` where
//! the composed ops must run (see [`super::encoder_block::enabled`] for the switch).

use candle_core::{Result, Tensor};

use super::activation::{swiglu_grads_in_place, swiglu_values};
use super::encoder_block::enabled;
use super::first_order_fused;
use super::fused_attention::{self, Dims, MaskRows};
use super::fused_block::{
    apply, block_mask, frozen_fits, shared_backward, shared_forward, three, two, BlockElem, Ctx,
    LinearSpec, Sublayer,
};
use super::norm_grad::{rows_backward, Norm};

/// An RMSNorm's frozen weight `[d]` and epsilon.
#[derive(Clone, Copy)]
pub struct RmsNormSpec<'a> {
    pub w: &'a Tensor,
    pub eps: f64,
}

/// Attention heads: query heads, key/value heads (GQA).
#[derive(Clone, Copy)]
pub struct Heads {
    pub q: usize,
    pub kv: usize,
}

/// `h + attn(rope(n Wq^T), rope(n Wk^T), n Wv^T) Wo^T` with `n = rmsnorm(h)` for `h: [b, t, d]`,
/// `linears` q, k, v, o, RoPE tables `cos`, `sin: [t, head_dim / 2]` for the sequence's
/// positions and an additive `mask` broadcastable to `[b, heads, t, t]`; `None` where the
/// composed ops must run.
pub fn decoder_attention(
    h: &Tensor,
    linears: [LinearSpec; 4],
    norm: RmsNormSpec,
    heads: Heads,
    (cos, sin): (&Tensor, &Tensor),
    mask: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let (b, t, d) = h.dims3()?;
    let q_out = linears[0].out_features()?;
    if heads.q == 0
        || heads.kv == 0
        || !heads.q.is_multiple_of(heads.kv)
        || !q_out.is_multiple_of(heads.q)
    {
        candle_core::bail!(
            "decoder attention: {q_out} query features over {} heads, {} key/value heads",
            heads.q,
            heads.kv
        );
    }
    let hd = q_out / heads.q;
    let kv_out = heads.kv * hd;
    let tables_ok = [cos, sin]
        .iter()
        .all(|c| c.dims() == [t, hd / 2] && c.dtype() == h.dtype());
    let outs_ok = linears[1].out_features()? == kv_out && linears[2].out_features()? == kv_out;
    let mask = match mask {
        Some(m) if m.dtype() != h.dtype() || m.rank() != 4 => return Ok(None),
        m => m
            .map(|m| block_mask("decoder attention", m, [b, heads.q, t]))
            .transpose()?,
    };
    if !tables_ok
        || !outs_ok
        || !hd.is_multiple_of(2)
        || !fuses(h, &linears, &[d, d, d, q_out], &norm)?
    {
        return Ok(None);
    }
    let dims = Dims {
        b,
        tq: t,
        tk: t,
        h: heads.q,
        hkv: heads.kv,
        d: hd,
    };
    let neg_sin = sin.neg()?;
    let y = apply(h, &linears, &[norm.w, cos, sin, &neg_sin], |at| {
        DecoderAttention {
            dims,
            scale: 1.0 / (hd as f64).sqrt(),
            mask,
            norm: (at[0], norm.eps),
            rope: [at[1], at[2], at[3]],
        }
    })?;
    Ok(Some(y))
}

/// `h + swiglu(n Wg^T, n Wu^T) Wd^T` with `n = rmsnorm(h)` for `h: [b, t, d]` and `linears`
/// gate, up, down; `None` where the composed ops must run.
pub fn decoder_mlp(
    h: &Tensor,
    linears: [LinearSpec; 3],
    norm: RmsNormSpec,
) -> Result<Option<Tensor>> {
    let d = h.dim(candle_core::D::Minus1)?;
    let f = linears[0].out_features()?;
    if linears[1].out_features()? != f || !fuses(h, &linears, &[d, d, f], &norm)? {
        return Ok(None);
    }
    let y = apply(h, &linears, &[norm.w], |at| DecoderMlp {
        norm: (at[0], norm.eps),
    })?;
    Ok(Some(y))
}

/// Whether the fused op may run: first order on the CPU, linears that fit (the last one back to
/// `d` features), a frozen norm weight of `h`'s dtype.
fn fuses(h: &Tensor, specs: &[LinearSpec], inputs: &[usize], norm: &RmsNormSpec) -> Result<bool> {
    let d = h.dim(candle_core::D::Minus1)?;
    let norm_ok = frozen_fits(norm.w, h) && norm.w.elem_count() == d;
    let fits = specs.iter().zip(inputs).all(|(s, &k)| s.fits(h, k));
    let out_ok = specs
        .last()
        .is_some_and(|s| s.out_features().ok() == Some(d));
    Ok(enabled() && first_order_fused(&[h]) && norm_ok && fits && out_ok)
}

/// `rmsnorm(h) * w` over rows.
fn rms_norm<T: BlockElem>(h: &[T], (w, eps): (usize, f64), fz: &[&[T]]) -> Vec<T> {
    super::rms_norm::fwd(h, fz[w], eps)
}

/// The gradient reaching `h` through `rmsnorm(h) * w` for the gradient `g` of its output.
fn rms_norm_grad<T: BlockElem>(h: &[T], g: &[T], (w, eps): (usize, f64), fz: &[&[T]]) -> Vec<T> {
    let norm = Norm {
        eps,
        centered: false,
        want_params: false,
    };
    rows_backward(h, fz[w], g, norm).0
}

/// `out += a` on the threads.
fn add_onto<T: BlockElem>(out: &mut [T], a: &[T]) {
    use rayon::prelude::*;
    out.par_chunks_mut(1 << 14)
        .zip(a.par_chunks(1 << 14))
        .for_each(|(o, a)| o.iter_mut().zip(a).for_each(|(o, &a)| *o += a));
}

struct DecoderAttention {
    dims: Dims,
    scale: f64,
    mask: Option<Tensor>,
    /// The norm weight (index into the frozen tensors) and epsilon.
    norm: (usize, f64),
    /// Indices of `cos`, `sin` and `-sin`.
    rope: [usize; 3],
}

impl DecoderAttention {
    /// RoPE over `x: [b, t, heads, head_dim]`; `inverse` rotates back (the backward).
    fn rotate<T: BlockElem>(&self, x: &[T], heads: usize, inverse: bool, fz: &[&[T]]) -> Vec<T> {
        let [cos, sin, neg_sin] = self.rope;
        let sin = if inverse { neg_sin } else { sin };
        let Dims { b, tq, d, .. } = self.dims;
        super::rope::fwd(x, fz[cos], fz[sin], &[b, tq, heads, d])
    }
}

impl Sublayer for DecoderAttention {
    const NAME: &'static str = "metapeft-decoder-attention";

    fn forward<T: BlockElem>(&self, h: &[T], c: &Ctx<T>) -> Result<(Vec<T>, Vec<Vec<T>>)> {
        let (l, fz, pack) = (c.l, c.fz, c.pack);
        let n = rms_norm(h, self.norm, fz);
        let [q, k, v] = three(shared_forward(&[&l[0], &l[1], &l[2]], &n, c)?)?;
        let q = self.rotate(&q, self.dims.h, false, fz);
        let k = self.rotate(&k, self.dims.hkv, false, fz);
        let mask = MaskRows::new(&self.mask, self.dims.tk)?;
        let a = fused_attention::forward(self.dims, &q, &k, &v, &mask, self.scale);
        let y = l[3].forward(&a, fz, pack, Some(h))?;
        Ok((y, vec![n, q, k, v, a]))
    }

    fn backward<T: BlockElem>(
        &self,
        g: &[T],
        h: &[T],
        kept: &[&[T]],
        c: &Ctx<T>,
        dpack: &mut [T],
    ) -> Result<Vec<T>> {
        let (l, fz, pack) = (c.l, c.fz, c.pack);
        let [n, q, k, v, a] = [kept[0], kept[1], kept[2], kept[3], kept[4]];
        let da = l[3]
            .backward(g, a, fz, pack, dpack, None)?
            .unwrap_or_default();
        let mask = MaskRows::new(&self.mask, self.dims.tk)?;
        let (dq, dk, dv) = fused_attention::backward(self.dims, [q, k, v, &da], &mask, self.scale);
        let dq = self.rotate(&dq, self.dims.h, true, fz);
        let dk = self.rotate(&dk, self.dims.hkv, true, fz);
        let qkv = [&l[0], &l[1], &l[2]];
        let dn = shared_backward(&qkv, &[&dq, &dk, &dv], n, c, dpack, None)?.unwrap_or_default();
        // The residual path adds the output gradient as it is.
        let mut dh = rms_norm_grad(h, &dn, self.norm, fz);
        add_onto(&mut dh, g);
        Ok(dh)
    }
}

struct DecoderMlp {
    norm: (usize, f64),
}

impl Sublayer for DecoderMlp {
    const NAME: &'static str = "metapeft-decoder-mlp";

    fn forward<T: BlockElem>(&self, h: &[T], c: &Ctx<T>) -> Result<(Vec<T>, Vec<Vec<T>>)> {
        let (l, fz, pack) = (c.l, c.fz, c.pack);
        let n = rms_norm(h, self.norm, fz);
        let [gate, up] = two(shared_forward(&[&l[0], &l[1]], &n, c)?)?;
        let y = l[2].forward(&swiglu_values(&gate, &up), fz, pack, Some(h))?;
        Ok((y, vec![n, gate, up]))
    }

    fn backward<T: BlockElem>(
        &self,
        g: &[T],
        h: &[T],
        kept: &[&[T]],
        c: &Ctx<T>,
        dpack: &mut [T],
    ) -> Result<Vec<T>> {
        let (l, fz, pack) = (c.l, c.fz, c.pack);
        let [n, gate, up] = [kept[0], kept[1], kept[2]];
        // The down projection's input, only for its LoRA factors' gradients.
        let act = match l[2].has_lora() {
            true => swiglu_values(gate, up),
            false => vec![],
        };
        let mut dgate = l[2]
            .backward(g, &act, fz, pack, dpack, None)?
            .unwrap_or_default();
        let dup = swiglu_grads_in_place(gate, up, &mut dgate);
        let gate_up = [&l[0], &l[1]];
        let dn = shared_backward(&gate_up, &[&dgate, &dup], n, c, dpack, None)?.unwrap_or_default();
        let mut dh = rms_norm_grad(h, &dn, self.norm, fz);
        add_onto(&mut dh, g);
        Ok(dh)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::fused_block::testing::composed_linear;
    use crate::ops::fused_block::FrozenWeight;
    use crate::ops::gradcheck::{assert_same_value_and_gradients, check, randn_f64};
    use candle_core::{DType, Device, Var};

    /// RMSNorm composed from candle ops.
    fn composed_rms_norm(h: &Tensor, n: &RmsNormSpec) -> Result<Tensor> {
        let ms = h.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
        h.broadcast_div(&(ms + n.eps)?.sqrt()?)?.broadcast_mul(n.w)
    }

    /// Linears q, k, v, o, gate, up, down; biases on q, k, v (Qwen2); LoRA on q, v, o, down.
    struct Layer {
        w: Vec<Tensor>,
        b: Vec<Tensor>,
        a: Vec<Var>,
        bb: Vec<Var>,
        norm: Tensor,
        heads: Heads,
        tables: (Tensor, Tensor),
    }

    const ADAPTED: [usize; 4] = [0, 2, 3, 6];

    fn layer(d: usize, f: usize, heads: Heads, hd: usize, t: usize, seed: u64) -> Result<Layer> {
        let (qo, kvo) = (heads.q * hd, heads.kv * hd);
        let shapes = [(qo, d), (kvo, d), (kvo, d), (d, qo), (f, d), (f, d), (d, f)];
        let r = 2;
        let rope =
            crate::ops::RopeTables::new(hd, 10_000.0, None, t + 3, DType::F64, &Device::Cpu)?;
        // Positions 3.. as after a cached prompt: the tables are a window, not the start.
        let tables = rope.window(3, t)?;
        let mut l = Layer {
            w: vec![],
            b: vec![],
            a: vec![],
            bb: vec![],
            norm: (randn_f64(&[d], seed, 0.2)? + 1.0)?,
            heads,
            tables,
        };
        for (i, &(n, k)) in shapes.iter().enumerate() {
            let s = seed + 10 * (i as u64 + 1);
            l.w.push(randn_f64(&[n, k], s, 0.3)?);
            l.b.push(randn_f64(&[n], s + 1, 0.3)?);
            l.a.push(Var::from_tensor(&randn_f64(&[r, k], s + 2, 0.3)?)?);
            l.bb.push(Var::from_tensor(&randn_f64(&[n, r], s + 3, 0.3)?)?);
        }
        Ok(l)
    }

    impl Layer {
        fn spec<'a>(
            &'a self,
            i: usize,
            factors: Option<(&'a Tensor, &'a Tensor)>,
        ) -> LinearSpec<'a> {
            LinearSpec {
                w: FrozenWeight::Dense(&self.w[i]),
                b: (i < 3).then(|| &self.b[i]),
                lora: factors.map(|(a, b)| (a, b, 0.7)),
            }
        }

        fn norm(&self) -> RmsNormSpec<'_> {
            RmsNormSpec {
                w: &self.norm,
                eps: 1e-6,
            }
        }

        fn lora(&self, i: usize) -> Option<(&Tensor, &Tensor)> {
            ADAPTED
                .contains(&i)
                .then(|| (self.a[i].as_tensor(), self.bb[i].as_tensor()))
        }

        fn trained(&self, among: std::ops::Range<usize>) -> Vec<&Var> {
            ADAPTED
                .iter()
                .filter(|i| among.contains(i))
                .flat_map(|&i| [&self.a[i], &self.bb[i]])
                .collect()
        }

        fn attention(
            &self,
            h: &Tensor,
            l: [LinearSpec; 4],
            mask: Option<&Tensor>,
        ) -> Result<Option<Tensor>> {
            let (cos, sin) = &self.tables;
            decoder_attention(h, l, self.norm(), self.heads, (cos, sin), mask)
        }

        fn composed_attention(
            &self,
            h: &Tensor,
            l: &[LinearSpec; 4],
            mask: Option<&Tensor>,
        ) -> Result<Tensor> {
            let (b, t, _) = h.dims3()?;
            let hd = l[0].out_features()? / self.heads.q;
            let (cos, sin) = &self.tables;
            let n = composed_rms_norm(h, &self.norm())?;
            let heads_of = |y: Tensor, heads: usize| y.reshape((b, t, heads, hd));
            let q = crate::ops::rope(
                &heads_of(composed_linear(&n, &l[0])?, self.heads.q)?,
                cos,
                sin,
            )?;
            let k = crate::ops::rope(
                &heads_of(composed_linear(&n, &l[1])?, self.heads.kv)?,
                cos,
                sin,
            )?;
            let v = heads_of(composed_linear(&n, &l[2])?, self.heads.kv)?;
            // GQA: each key/value head serves `q / kv` consecutive query heads.
            let repeat = |x: Tensor| -> Result<Tensor> {
                let g = self.heads.q / self.heads.kv;
                x.unsqueeze(3)?
                    .repeat((1, 1, 1, g, 1))?
                    .reshape((b, t, self.heads.q, hd))?
                    .transpose(1, 2)
            };
            let a = crate::ops::attention(
                &q.transpose(1, 2)?,
                &repeat(k)?,
                &repeat(v)?,
                mask,
                1.0 / (hd as f64).sqrt(),
            )?
            .transpose(1, 2)?
            .reshape((b, t, self.heads.q * hd))?;
            h + composed_linear(&a, &l[3])?
        }

        fn composed_mlp(&self, h: &Tensor, l: &[LinearSpec; 3]) -> Result<Tensor> {
            let n = composed_rms_norm(h, &self.norm())?;
            let gate = composed_linear(&n, &l[0])?;
            let silu = (&gate * candle_nn::ops::sigmoid(&gate)?)?;
            h + composed_linear(&(silu * composed_linear(&n, &l[1])?)?, &l[2])?
        }
    }

    /// Causal, plus padding of the last two keys of the second sequence. (Left padding would
    /// hide every key from the first rows: the composed softmax then spreads over scores near
    /// -1e9, which finite differences cannot resolve.)
    fn causal_padded(b: usize, t: usize) -> Result<Tensor> {
        let keep: Vec<u32> = (0..b * t)
            .map(|i| u32::from(i / t == 0 || i % t < t - 2))
            .collect();
        let am = Tensor::from_vec(keep, (b, t), &Device::Cpu)?;
        let pad = crate::ops::padding_mask(&am, DType::F64)?;
        crate::ops::causal_mask(t, t, 0, DType::F64, &Device::Cpu)?.broadcast_add(&pad)
    }

    /// Both sublayers equal their composition in value and in the gradients of the input and of
    /// every LoRA factor: with and without LoRA, grouped-query attention, causal and padding
    /// masks, one query block and several, products small and split over the threads.
    #[test]
    fn value_and_gradients_equal_the_composed_ops() -> Result<()> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let gqa = Heads { q: 4, kv: 2 };
        for (b, t, d, f, heads, hd) in [
            (2, 5, 12, 20, gqa, 4),
            (2, 70, 48, 96, gqa, 8),
            (1, 40, 24, 32, Heads { q: 3, kv: 3 }, 8),
        ] {
            let l = layer(d, f, heads, hd, t, 3)?;
            let h = Var::from_tensor(&randn_f64(&[b, t, d], 1, 1.0)?)?;
            let probe = randn_f64(&[b, t, d], 2, 1.0)?;
            let causal = crate::ops::causal_mask(t, t, 0, DType::F64, &Device::Cpu)?;
            let masks = [None, Some(causal), Some(causal_padded(b, t)?)];
            for with_lora in [true, false] {
                let spec = |i: usize| l.spec(i, l.lora(i).filter(|_| with_lora));
                let vars = |among| {
                    let mut vars = vec![&h];
                    if with_lora {
                        vars.extend(l.trained(among));
                    }
                    vars
                };
                let ht = h.as_tensor();
                let att = [spec(0), spec(1), spec(2), spec(3)];
                for mask in &masks {
                    let got = pool.install(|| l.attention(ht, att, mask.as_ref()))?;
                    let got = got.expect("the fused attention sublayer runs");
                    let want = l.composed_attention(ht, &att, mask.as_ref())?;
                    assert_same_value_and_gradients(
                        &pool,
                        &got,
                        &want,
                        &probe,
                        &vars(0..4),
                        1e-10,
                    )?;
                }
                let mlp = [spec(4), spec(5), spec(6)];
                let got = pool.install(|| decoder_mlp(ht, mlp, l.norm()))?;
                let got = got.expect("the fused MLP sublayer runs");
                let want = l.composed_mlp(ht, &mlp)?;
                assert_same_value_and_gradients(&pool, &got, &want, &probe, &vars(4..7), 1e-10)?;
            }
        }
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        let (b, t, d, f, hd) = (2, 4, 6, 8, 4);
        let l = layer(d, f, Heads { q: 2, kv: 1 }, hd, t, 7)?;
        let h = randn_f64(&[b, t, d], 4, 1.0)?;
        let mask = causal_padded(b, t)?;
        // Inputs: h, then A and B of q, v, o, down.
        let mut inputs = vec![h];
        for i in ADAPTED {
            inputs.push(l.a[i].as_tensor().detach());
            inputs.push(l.bb[i].as_tensor().detach());
        }
        let lora_of = |t: &[Tensor], i: usize| -> Option<(Tensor, Tensor)> {
            let j = ADAPTED.iter().position(|&m| m == i)?;
            Some((t[1 + 2 * j].clone(), t[2 + 2 * j].clone()))
        };
        let attention = |t: &[Tensor]| -> Result<Tensor> {
            let fs: Vec<_> = (0..4).map(|i| lora_of(t, i)).collect();
            let s = |i: usize| l.spec(i, fs[i].as_ref().map(|(a, b)| (a, b)));
            Ok(l.attention(&t[0], [s(0), s(1), s(2), s(3)], Some(&mask))?
                .expect("fused"))
        };
        let err = check(attention, &inputs, 1e-5)?;
        assert!(err < 1e-7, "attention sublayer: rel error {err}");
        let mlp = |t: &[Tensor]| -> Result<Tensor> {
            let fs: Vec<_> = (4..7).map(|i| lora_of(t, i)).collect();
            let s = |i: usize| l.spec(i, fs[i - 4].as_ref().map(|(a, b)| (a, b)));
            Ok(decoder_mlp(&t[0], [s(4), s(5), s(6)], l.norm())?.expect("fused"))
        };
        let err = check(mlp, &inputs, 1e-5)?;
        assert!(err < 1e-7, "MLP sublayer: rel error {err}");
        Ok(())
    }

    /// Every linear adapted, with different ranks: q, k, v and gate, up share their input, so
    /// their bottlenecks are computed together ([`super::super::fused_block::shared_forward`]);
    /// still equal to the composed ops in value and every gradient.
    #[test]
    fn every_linear_adapted_with_mixed_ranks() -> Result<()> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let (b, t, d, f, hd, heads) = (2, 11, 24, 40, 4, Heads { q: 4, kv: 2 });
        let l = layer(d, f, heads, hd, t, 17)?;
        let ranks = [3, 1, 2, 2, 4, 1, 3];
        let mut a = vec![];
        let mut bb = vec![];
        for (i, w) in l.w.iter().enumerate() {
            let (n, k) = w.dims2()?;
            a.push(Var::from_tensor(&randn_f64(
                &[ranks[i], k],
                100 + i as u64,
                0.3,
            )?)?);
            bb.push(Var::from_tensor(&randn_f64(
                &[n, ranks[i]],
                200 + i as u64,
                0.3,
            )?)?);
        }
        let spec = |i: usize| LinearSpec {
            w: FrozenWeight::Dense(&l.w[i]),
            b: (i < 3).then(|| &l.b[i]),
            lora: Some((a[i].as_tensor(), bb[i].as_tensor(), 0.5 + 0.1 * i as f64)),
        };
        let h = Var::from_tensor(&randn_f64(&[b, t, d], 1, 1.0)?)?;
        let probe = randn_f64(&[b, t, d], 2, 1.0)?;
        let mask = causal_padded(b, t)?;
        let vars = |among: std::ops::Range<usize>| -> Vec<&Var> {
            let mut vars = vec![&h];
            vars.extend(among.flat_map(|i| [&a[i], &bb[i]]));
            vars
        };
        let ht = h.as_tensor();
        let att = [spec(0), spec(1), spec(2), spec(3)];
        let got = pool
            .install(|| l.attention(ht, att, Some(&mask)))?
            .expect("fused");
        let want = l.composed_attention(ht, &att, Some(&mask))?;
        assert_same_value_and_gradients(&pool, &got, &want, &probe, &vars(0..4), 1e-10)?;
        let mlp = [spec(4), spec(5), spec(6)];
        let got = pool
            .install(|| decoder_mlp(ht, mlp, l.norm()))?
            .expect("fused");
        let want = l.composed_mlp(ht, &mlp)?;
        assert_same_value_and_gradients(&pool, &got, &want, &probe, &vars(4..7), 1e-10)?;
        Ok(())
    }

    /// A bf16/f16 base with f32 activations runs fused, widened inside: the same values and
    /// gradients as the f32 weights it widens to (widening is exact).
    #[test]
    fn half_precision_weights_equal_their_widened_copy() -> Result<()> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let (b, t, d, f, hd, heads) = (2, 6, 12, 20, 4, Heads { q: 4, kv: 2 });
        let l = layer(d, f, heads, hd, t, 11)?;
        let case = F32Case::new(&l, (b, t, d))?;
        for half in [DType::BF16, DType::F16] {
            let to = |ts: &[Tensor], dtype| {
                ts.iter()
                    .map(|t| t.to_dtype(dtype))
                    .collect::<Result<Vec<_>>>()
            };
            let (stored, bias) = (to(&l.w, half)?, to(&l.b, half)?);
            let (wide, wide_bias) = (to(&stored, DType::F32)?, to(&bias, DType::F32)?);
            let norm_half = l.norm.to_dtype(half)?;
            let norm_wide = norm_half.to_dtype(DType::F32)?;
            let norm = |w| RmsNormSpec { w, eps: 1e-6 };
            let got = pool.install(|| case.run(dense(&stored), &bias, norm(&norm_half), heads))?;
            let want =
                pool.install(|| case.run(dense(&wide), &wide_bias, norm(&norm_wide), heads))?;
            let (p, tol) = (&case.probe, 1e-6);
            assert_same_value_and_gradients(&pool, &got.0, &want.0, p, &case.vars(0..3), tol)?;
            assert_same_value_and_gradients(&pool, &got.1, &want.1, p, &case.vars(3..4), tol)?;
        }
        Ok(())
    }

    /// The seven weights `w` as dense frozen weights.
    fn dense(w: &[Tensor]) -> [FrozenWeight<'_>; 7] {
        std::array::from_fn(|i| FrozenWeight::Dense(&w[i]))
    }

    /// f32 inputs of the half-precision and quantized tests: the sublayers' input, a probe for
    /// the gradients, the LoRA factors of [`ADAPTED`], the RoPE tables and a padding mask.
    struct F32Case {
        h: Var,
        probe: Tensor,
        a: Vec<Var>,
        bb: Vec<Var>,
        tables: (Tensor, Tensor),
        mask: Tensor,
    }

    impl F32Case {
        fn new(l: &Layer, (b, t, d): (usize, usize, usize)) -> Result<Self> {
            let f32_of = |t: &Tensor| t.to_dtype(DType::F32);
            let vars = |vs: &[Var]| -> Result<Vec<Var>> {
                ADAPTED
                    .iter()
                    .map(|&i| Var::from_tensor(&f32_of(vs[i].as_tensor())?))
                    .collect()
            };
            Ok(Self {
                h: Var::from_tensor(&f32_of(&randn_f64(&[b, t, d], 1, 1.0)?)?)?,
                probe: f32_of(&randn_f64(&[b, t, d], 2, 1.0)?)?,
                a: vars(&l.a)?,
                bb: vars(&l.bb)?,
                tables: (f32_of(&l.tables.0)?, f32_of(&l.tables.1)?),
                mask: causal_padded(b, t)?.to_dtype(DType::F32)?,
            })
        }

        /// The input and the factors of the adapted linears `js` (positions in [`ADAPTED`]):
        /// q, v, o are 0..3 (attention), down is 3..4 (MLP).
        fn vars(&self, js: std::ops::Range<usize>) -> Vec<&Var> {
            let mut vars = vec![&self.h];
            vars.extend(js.flat_map(|j| [&self.a[j], &self.bb[j]]));
            vars
        }

        /// Both fused sublayers on the seven linears `ws` with biases `bias` and norm `n`.
        fn run(
            &self,
            ws: [FrozenWeight<'_>; 7],
            bias: &[Tensor],
            n: RmsNormSpec,
            heads: Heads,
        ) -> Result<(Tensor, Tensor)> {
            let s = specs_of(ws, bias, (&self.a, &self.bb));
            let (cos, sin) = (&self.tables.0, &self.tables.1);
            let h = self.h.as_tensor();
            let att = decoder_attention(
                h,
                [s[0], s[1], s[2], s[3]],
                n,
                heads,
                (cos, sin),
                Some(&self.mask),
            )?;
            let mlp = decoder_mlp(h, [s[4], s[5], s[6]], n)?;
            Ok((att.expect("fused attention"), mlp.expect("fused MLP")))
        }
    }

    /// The seven linears on weights `ws`, biases on q, k, v and the LoRA factors of [`ADAPTED`].
    fn specs_of<'a>(
        ws: [FrozenWeight<'a>; 7],
        bias: &'a [Tensor],
        (a, bb): (&'a [Var], &'a [Var]),
    ) -> [LinearSpec<'a>; 7] {
        std::array::from_fn(|i| LinearSpec {
            w: ws[i],
            b: (i < 3).then(|| &bias[i]),
            lora: ADAPTED
                .iter()
                .position(|&m| m == i)
                .map(|j| (a[j].as_tensor(), bb[j].as_tensor(), 0.7)),
        })
    }

    /// Quantized blocks (QLoRA-style) run fused through the exact tiled product: the same values
    /// and gradients as the dense weights they dequantize to, biases and residuals included.
    #[test]
    fn quantized_weights_equal_their_dequantized_copy() -> Result<()> {
        use crate::ops::QuantizedWeight;
        use candle_core::quantized::GgmlDType;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        // Reductions of 64, 32 and 96: whole Q8_0 / Q4_1 blocks of 32.
        let (b, t, d, f, hd, heads) = (2, 9, 64, 96, 8, Heads { q: 4, kv: 2 });
        let l = layer(d, f, heads, hd, t, 13)?;
        let case = F32Case::new(&l, (b, t, d))?;
        let f32_of = |t: &Tensor| t.to_dtype(DType::F32);
        let bias: Vec<Tensor> = l.b.iter().map(f32_of).collect::<Result<_>>()?;
        let norm = f32_of(&l.norm)?;
        let n = RmsNormSpec {
            w: &norm,
            eps: 1e-6,
        };
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_1] {
            let q: Vec<QuantizedWeight> =
                l.w.iter()
                    .map(|w| QuantizedWeight::quantize(&f32_of(w)?, dtype))
                    .collect::<Result<_>>()?;
            let dequantized: Vec<Tensor> =
                q.iter().map(|q| q.dequantize()).collect::<Result<_>>()?;
            let quantized: [FrozenWeight; 7] =
                std::array::from_fn(|i| FrozenWeight::Quantized(&q[i]));
            let got = pool.install(|| case.run(quantized, &bias, n, heads))?;
            let want = pool.install(|| case.run(dense(&dequantized), &bias, n, heads))?;
            let (p, tol) = (&case.probe, 1e-4);
            assert_same_value_and_gradients(&pool, &got.0, &want.0, p, &case.vars(0..3), tol)?;
            assert_same_value_and_gradients(&pool, &got.1, &want.1, p, &case.vars(3..4), tol)?;
        }
        Ok(())
    }

    /// A trained norm weight, or a graph of the gradients kept, leaves the sublayer to the
    /// composed ops; heads or masks that do not fit are errors.
    #[test]
    fn falls_back_or_fails_where_it_cannot_run() -> Result<()> {
        let (d, f, t) = (6, 8, 3);
        let l = layer(d, f, Heads { q: 2, kv: 1 }, 4, t, 9)?;
        let h = randn_f64(&[1, t, d], 5, 1.0)?;
        fn mlp(l: &Layer) -> [LinearSpec<'_>; 3] {
            [l.spec(4, None), l.spec(5, None), l.spec(6, None)]
        }
        assert!(decoder_mlp(&h, mlp(&l), l.norm())?.is_some());
        let w = Var::from_tensor(&l.norm)?;
        let trained = RmsNormSpec {
            w: w.as_tensor(),
            eps: 1e-6,
        };
        assert!(decoder_mlp(&h, mlp(&l), trained)?.is_none());
        let on_graph = crate::meta::second_order::on_graph_thread(|| {
            Ok(decoder_mlp(&h, mlp(&l), l.norm())?.is_none())
        })
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        assert!(on_graph, "a graph of the gradients takes the composed ops");
        let att = [
            l.spec(0, None),
            l.spec(1, None),
            l.spec(2, None),
            l.spec(3, None),
        ];
        assert!(l.attention(&h, att, None)?.is_some());
        let bad_heads = Layer {
            heads: Heads { q: 3, kv: 1 },
            ..layer(d, f, Heads { q: 2, kv: 1 }, 4, t, 9)?
        };
        assert!(bad_heads.attention(&h, att, None).is_err());
        let wide = Tensor::zeros((2, 1, t, t), DType::F64, &Device::Cpu)?;
        assert!(
            l.attention(&h, att, Some(&wide)).is_err(),
            "mask of 2 sequences for 1"
        );
        Ok(())
    }
}
