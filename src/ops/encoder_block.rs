//! A post-norm encoder layer's two sublayers (BERT) as one op each, first order:
//! attention `LN(x + attn(x Wq^T + bq, x Wk^T + bk, x Wv^T + bv) Wo^T + bo)` and feed-forward
//! `LN(x + gelu(x Wi^T + bi) Wo^T + bo)`, any of their linears with a LoRA term (see
//! [`super::fused_block`] for why). The op keeps q, k, v, the attention output and the pre-norm sum
//! (attention), or the intermediate pre-activation and the pre-norm sum (feed-forward): what the
//! composed ops keep, less the GELU output; the backward recomputes GELU and the rank-`r`
//! bottlenecks. `None` where the composed ops must run: a graph of the gradients kept, off the
//! CPU, other dtypes, trained norm or bias parameters.

use candle_core::{Result, Tensor};

use super::first_order_fused;
use super::fused_attention::{self, Dims, MaskRows};
use super::fused_block::{
    apply, block_mask, frozen_fits, shared_backward, shared_forward, three, BlockElem, Ctx,
    LinearSpec, Sublayer,
};
use super::norm_grad::{rows_backward, Norm};

/// Whether encoder and decoder sublayers run as one op each: `METAPEFT_FUSED_BLOCKS=0` keeps the
/// composed ops (for A/B timing).
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("METAPEFT_FUSED_BLOCKS").map_or(true, |v| v != "0"))
}

/// A LayerNorm's frozen weight and bias `[d]` and epsilon.
#[derive(Clone, Copy)]
pub struct LayerNormSpec<'a> {
    pub w: &'a Tensor,
    pub b: &'a Tensor,
    pub eps: f64,
}

/// `LN(x + attn(q, k, v) Wo^T + bo)` for `x: [b, t, d]`, `linears` q, k, v, o, `heads` heads and
/// an additive `mask` broadcastable to `[b, heads, t, t]`; `None` where the composed ops must run.
pub fn encoder_attention(
    x: &Tensor,
    linears: [LinearSpec; 4],
    heads: usize,
    mask: Option<&Tensor>,
    norm: LayerNormSpec,
) -> Result<Option<Tensor>> {
    let (b, t, d) = x.dims3()?;
    if heads == 0 || d % heads != 0 {
        candle_core::bail!("encoder attention: {d} features over {heads} heads");
    }
    let mask = match mask {
        Some(m) if m.dtype() != x.dtype() || m.rank() != 4 => return Ok(None),
        m => m
            .map(|m| block_mask("encoder attention", m, [b, heads, t]))
            .transpose()?,
    };
    if !fuses(x, &linears, &[d, d, d, d], &norm)? {
        return Ok(None);
    }
    let dims = Dims {
        b,
        tq: t,
        tk: t,
        h: heads,
        hkv: heads,
        d: d / heads,
    };
    let scale = 1.0 / ((d / heads) as f64).sqrt();
    let y = apply(x, &linears, &[norm.w, norm.b], |at| EncoderAttention {
        dims,
        scale,
        mask,
        norm: (at[0], at[1], norm.eps),
    })?;
    Ok(Some(y))
}

/// `LN(x + gelu(x Wi^T + bi) Wo^T + bo)` for `x: [b, t, d]` and `linears` up, down; `None` where
/// the composed ops must run.
pub fn encoder_ffn(
    x: &Tensor,
    linears: [LinearSpec; 2],
    norm: LayerNormSpec,
) -> Result<Option<Tensor>> {
    let d = x.dim(candle_core::D::Minus1)?;
    let f = linears[0].out_features()?;
    if !fuses(x, &linears, &[d, f], &norm)? {
        return Ok(None);
    }
    let y = apply(x, &linears, &[norm.w, norm.b], |at| EncoderFfn {
        norm: (at[0], at[1], norm.eps),
    })?;
    Ok(Some(y))
}

/// Whether the fused op may run: first order on the CPU, linears that fit (the last one back to
/// `d` features), a frozen norm of `x`'s dtype.
fn fuses(x: &Tensor, specs: &[LinearSpec], inputs: &[usize], norm: &LayerNormSpec) -> Result<bool> {
    let d = x.dim(candle_core::D::Minus1)?;
    let norm_ok = [norm.w, norm.b]
        .iter()
        .all(|t| frozen_fits(t, x) && t.elem_count() == d);
    let fits = specs.iter().zip(inputs).all(|(s, &k)| s.fits(x, k));
    let out_ok = specs
        .last()
        .is_some_and(|s| s.out_features().ok() == Some(d));
    Ok(enabled() && first_order_fused(&[x]) && norm_ok && fits && out_ok)
}

/// `LN(h)` for the pre-norm sum `h`, and the input gradient of `LN` at `h` for `g`.
fn layer_norm<T: BlockElem>(h: &[T], (w, b, eps): (usize, usize, f64), fz: &[&[T]]) -> Vec<T> {
    super::layer_norm::fwd(h, fz[w], fz[b], eps)
}

fn layer_norm_grad<T: BlockElem>(
    h: &[T],
    g: &[T],
    (w, _, eps): (usize, usize, f64),
    fz: &[&[T]],
) -> Vec<T> {
    let norm = Norm {
        eps,
        centered: true,
        want_params: false,
    };
    rows_backward(h, fz[w], g, norm).0
}

/// The attention sublayer; keeps q, k, v, the attention output and the pre-norm sum.
struct EncoderAttention {
    dims: Dims,
    scale: f64,
    mask: Option<Tensor>,
    /// The LayerNorm's weight and bias (indices into the frozen tensors) and epsilon.
    norm: (usize, usize, f64),
}

impl Sublayer for EncoderAttention {
    const NAME: &'static str = "metapeft-encoder-attention";

    fn forward<T: BlockElem>(&self, x: &[T], c: &Ctx<T>) -> Result<(Vec<T>, Vec<Vec<T>>)> {
        let (l, fz, pack) = (c.l, c.fz, c.pack);
        let [q, k, v] = three(shared_forward(&[&l[0], &l[1], &l[2]], x, c)?)?;
        let mask = MaskRows::new(&self.mask, self.dims.tk)?;
        let a = fused_attention::forward(self.dims, &q, &k, &v, &mask, self.scale);
        let h = l[3].forward(&a, fz, pack, Some(x))?;
        let y = layer_norm(&h, self.norm, fz);
        Ok((y, vec![q, k, v, a, h]))
    }

    fn backward<T: BlockElem>(
        &self,
        g: &[T],
        x: &[T],
        kept: &[&[T]],
        c: &Ctx<T>,
        dpack: &mut [T],
    ) -> Result<Vec<T>> {
        let (l, fz, pack) = (c.l, c.fz, c.pack);
        let [q, k, v, a, h] = [kept[0], kept[1], kept[2], kept[3], kept[4]];
        let dh = layer_norm_grad(h, g, self.norm, fz);
        // The residual path: the pre-norm sum's gradient reaches x as it is.
        let mut dx = super::par_copy(&dh, 1 << 14, |_| {});
        let da = l[3]
            .backward(&dh, a, fz, pack, dpack, None)?
            .unwrap_or_default();
        let mask = MaskRows::new(&self.mask, self.dims.tk)?;
        let (dq, dk, dv) = fused_attention::backward(self.dims, [q, k, v, &da], &mask, self.scale);
        let qkv = [&l[0], &l[1], &l[2]];
        shared_backward(&qkv, &[&dq, &dk, &dv], x, c, dpack, Some(&mut dx))?;
        Ok(dx)
    }
}

/// The feed-forward sublayer; keeps the intermediate pre-activation and the pre-norm sum.
struct EncoderFfn {
    norm: (usize, usize, f64),
}

impl Sublayer for EncoderFfn {
    const NAME: &'static str = "metapeft-encoder-ffn";

    fn forward<T: BlockElem>(&self, x: &[T], c: &Ctx<T>) -> Result<(Vec<T>, Vec<Vec<T>>)> {
        let (l, fz, pack) = (c.l, c.fz, c.pack);
        let up = l[0].forward(x, fz, pack, None)?;
        let h = l[1].forward(&T::gelu_values(&up), fz, pack, Some(x))?;
        let y = layer_norm(&h, self.norm, fz);
        Ok((y, vec![up, h]))
    }

    fn backward<T: BlockElem>(
        &self,
        g: &[T],
        x: &[T],
        kept: &[&[T]],
        c: &Ctx<T>,
        dpack: &mut [T],
    ) -> Result<Vec<T>> {
        let (l, fz, pack) = (c.l, c.fz, c.pack);
        let (up, h) = (kept[0], kept[1]);
        let dh = layer_norm_grad(h, g, self.norm, fz);
        let mut dx = super::par_copy(&dh, 1 << 14, |_| {});
        // The down projection's input, only for its LoRA factors' gradients.
        let act = match l[1].has_lora() {
            true => T::gelu_values(up),
            false => vec![],
        };
        let dact = l[1].backward(&dh, &act, fz, pack, dpack, None)?;
        let dup = T::gelu_grads(up, &dact.unwrap_or_default());
        l[0].backward(&dup, x, fz, pack, dpack, Some(&mut dx))?;
        Ok(dx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::fused_block::testing::composed_linear;
    use crate::ops::fused_block::FrozenWeight;
    use crate::ops::gradcheck::{assert_same_value_and_gradients, check, randn_f64};
    use candle_core::Var;

    fn composed_attention(
        x: &Tensor,
        l: &[LinearSpec; 4],
        heads: usize,
        mask: Option<&Tensor>,
        n: &LayerNormSpec,
    ) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let split = |y: Tensor| y.reshape((b, t, heads, d / heads))?.transpose(1, 2);
        let (q, k, v) = (
            split(composed_linear(x, &l[0])?)?,
            split(composed_linear(x, &l[1])?)?,
            split(composed_linear(x, &l[2])?)?,
        );
        let scale = 1.0 / ((d / heads) as f64).sqrt();
        let a = crate::ops::attention(&q, &k, &v, mask, scale)?
            .transpose(1, 2)?
            .reshape((b, t, d))?;
        let h = (x + composed_linear(&a, &l[3])?)?;
        crate::ops::layer_norm(&h, n.w, n.b, n.eps)
    }

    fn composed_ffn(x: &Tensor, l: &[LinearSpec; 2], n: &LayerNormSpec) -> Result<Tensor> {
        let up = composed_linear(x, &l[0])?;
        let act = (&up * (((&up / std::f64::consts::SQRT_2)?.erf()? + 1.0)? * 0.5)?)?;
        let h = (x + composed_linear(&act, &l[1])?)?;
        crate::ops::layer_norm(&h, n.w, n.b, n.eps)
    }

    /// The parameters of one layer: weights and biases, LoRA factors on q, v, o and the down
    /// projection (k and the up projection plain), norms.
    struct Layer {
        w: Vec<Tensor>,
        b: Vec<Tensor>,
        a: Vec<Var>,
        bb: Vec<Var>,
        norm: (Tensor, Tensor),
    }

    /// Linears: q, k, v, o of `d -> d`, up `d -> f`, down `f -> d`.
    fn layer(d: usize, f: usize, seed: u64) -> Result<Layer> {
        let shapes = [(d, d), (d, d), (d, d), (d, d), (f, d), (d, f)];
        let r = 2;
        let mut l = Layer {
            w: vec![],
            b: vec![],
            a: vec![],
            bb: vec![],
            norm: (
                (randn_f64(&[d], seed, 0.2)? + 1.0)?,
                randn_f64(&[d], seed + 1, 0.2)?,
            ),
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
                b: Some(&self.b[i]),
                lora: factors.map(|(a, b)| (a, b, 0.7)),
            }
        }

        fn norm(&self) -> LayerNormSpec<'_> {
            LayerNormSpec {
                w: &self.norm.0,
                b: &self.norm.1,
                eps: 1e-5,
            }
        }

        fn lora(&self, i: usize) -> Option<(&Tensor, &Tensor)> {
            [0, 2, 3, 5]
                .contains(&i)
                .then(|| (self.a[i].as_tensor(), self.bb[i].as_tensor()))
        }

        /// The LoRA factors of linears `among`.
        fn trained(&self, among: std::ops::Range<usize>) -> Vec<&Var> {
            [0, 2, 3, 5]
                .iter()
                .filter(|i| among.contains(i))
                .flat_map(|&i| [&self.a[i], &self.bb[i]])
                .collect()
        }
    }

    fn padding(b: usize, t: usize) -> Result<Tensor> {
        let keep: Vec<u32> = (0..b * t).map(|i| u32::from(i % t < t - i / t)).collect();
        let am = Tensor::from_vec(keep, (b, t), &candle_core::Device::Cpu)?;
        crate::ops::padding_mask(&am, candle_core::DType::F64)
    }

    /// Both sublayers equal their composition in value and in the gradients of the input and of
    /// every LoRA factor, with and without LoRA, one block of queries and several, small products
    /// and products split over the threads.
    #[test]
    fn value_and_gradients_equal_the_composed_ops() -> Result<()> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        for (b, t, d, f, heads) in [(2, 5, 12, 20, 3), (2, 70, 48, 96, 4)] {
            let l = layer(d, f, 3)?;
            let x = Var::from_tensor(&randn_f64(&[b, t, d], 1, 1.0)?)?;
            let mask = padding(b, t)?;
            let probe = randn_f64(&[b, t, d], 2, 1.0)?;
            for with_lora in [true, false] {
                let spec = |i: usize| l.spec(i, l.lora(i).filter(|_| with_lora));
                let vars = |among| {
                    let mut vars = vec![&x];
                    if with_lora {
                        vars.extend(l.trained(among));
                    }
                    vars
                };
                let att = [spec(0), spec(1), spec(2), spec(3)];
                let xt = x.as_tensor();
                let got =
                    pool.install(|| encoder_attention(xt, att, heads, Some(&mask), l.norm()))?;
                let want = composed_attention(xt, &att, heads, Some(&mask), &l.norm())?;
                let got = got.expect("the fused attention sublayer runs");
                assert_same_value_and_gradients(&pool, &got, &want, &probe, &vars(0..4), 1e-10)?;
                let ffn = [spec(4), spec(5)];
                let got = pool.install(|| encoder_ffn(xt, ffn, l.norm()))?;
                let want = composed_ffn(xt, &ffn, &l.norm())?;
                let got = got.expect("the fused feed-forward sublayer runs");
                assert_same_value_and_gradients(&pool, &got, &want, &probe, &vars(4..6), 1e-10)?;
            }
        }
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        let (b, t, d, f, heads) = (2, 3, 4, 6, 2);
        let l = layer(d, f, 7)?;
        let x = randn_f64(&[b, t, d], 4, 1.0)?;
        let mask = padding(b, t)?;
        // Inputs: x, then A and B of q, v, o, down.
        let mut inputs = vec![x];
        for i in [0, 2, 3, 5] {
            inputs.push(l.a[i].as_tensor().detach());
            inputs.push(l.bb[i].as_tensor().detach());
        }
        let lora_of = |t: &[Tensor], i: usize| -> Option<(Tensor, Tensor)> {
            let j = [0, 2, 3, 5].iter().position(|&m| m == i)?;
            Some((t[1 + 2 * j].clone(), t[2 + 2 * j].clone()))
        };
        let attention = |t: &[Tensor]| -> Result<Tensor> {
            let fs: Vec<_> = (0..4).map(|i| lora_of(t, i)).collect();
            let s = |i: usize| l.spec(i, fs[i].as_ref().map(|(a, b)| (a, b)));
            let y = encoder_attention(
                &t[0],
                [s(0), s(1), s(2), s(3)],
                heads,
                Some(&mask),
                l.norm(),
            )?;
            Ok(y.expect("fused"))
        };
        let err = check(attention, &inputs, 1e-5)?;
        assert!(err < 1e-7, "attention sublayer: rel error {err}");
        let ffn = |t: &[Tensor]| -> Result<Tensor> {
            let fs: Vec<_> = (4..6).map(|i| lora_of(t, i)).collect();
            let s = |i: usize| l.spec(i, fs[i - 4].as_ref().map(|(a, b)| (a, b)));
            Ok(encoder_ffn(&t[0], [s(4), s(5)], l.norm())?.expect("fused"))
        };
        let err = check(ffn, &inputs, 1e-5)?;
        assert!(err < 1e-7, "feed-forward sublayer: rel error {err}");
        Ok(())
    }

    /// A trained norm parameter, or a graph of the gradients kept, leaves the sublayer to the
    /// composed ops; shapes that do not fit are errors or fall back.
    #[test]
    fn falls_back_or_fails_where_it_cannot_run() -> Result<()> {
        let (d, f) = (4, 6);
        let l = layer(d, f, 9)?;
        let x = randn_f64(&[1, 3, d], 5, 1.0)?;
        fn specs(l: &Layer) -> [LinearSpec<'_>; 2] {
            [l.spec(4, None), l.spec(5, None)]
        }
        assert!(encoder_ffn(&x, specs(&l), l.norm())?.is_some());
        let w = Var::from_tensor(&l.norm.0)?;
        let trained = LayerNormSpec {
            w: w.as_tensor(),
            ..l.norm()
        };
        assert!(encoder_ffn(&x, specs(&l), trained)?.is_none());
        let on_graph = crate::meta::second_order::on_graph_thread(|| {
            Ok(encoder_ffn(&x, specs(&l), l.norm())?.is_none())
        })
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        assert!(on_graph, "a graph of the gradients takes the composed ops");
        // The up projection expects 4 inputs, the down one 6: swapped, nothing fits.
        assert!(encoder_ffn(&x, [l.spec(5, None), l.spec(4, None)], l.norm())?.is_none());
        let att = [
            l.spec(0, None),
            l.spec(1, None),
            l.spec(2, None),
            l.spec(3, None),
        ];
        assert!(encoder_attention(&x, att, 3, None, l.norm()).is_err());
        assert!(encoder_attention(&x, att, 2, None, l.norm())?.is_some());
        let wide = Tensor::zeros((2, 1, 1, 3), candle_core::DType::F64, x.device())?;
        let wide = encoder_attention(&x, att, 2, Some(&wide), l.norm());
        assert!(wide.is_err(), "a mask of 2 sequences for 1");
        Ok(())
    }
}
