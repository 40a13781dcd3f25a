//! The TAMS cell: a DARTS cell added to the FFN output of a layer.
//!
//! Nodes 0 and 1 are projections (hidden -> reduced) of the FFN input and output; node `n` in
//! 2..=4 sums one mixed edge from every earlier node, an edge being `sum_op arch[e, op] * op(x)`.
//! The output `mean(nodes 2, 3, 4)` is projected back (reduced -> hidden) and added to the FFN
//! output. The back projection starts at zero, so a fresh cell changes nothing.

use candle_core::{DType, IndexOp, Tensor};

use super::{Op, ARCH, EDGES, NUM_EDGES, NUM_OPS};
use crate::ops::linear;
use crate::params::ParamStore;
use crate::peft::Delta;
use crate::{Error, Result};

#[derive(Clone, Debug)]
pub struct TamsCell {
    layers: Vec<usize>,
    /// Decoders see only earlier positions (causal convolutions); encoders see both sides.
    causal: bool,
}

impl TamsCell {
    /// A cell in each of `layers` of a decoder. Prefer [`super::TamsConfig::build`], which checks
    /// the store and picks causal or centred convolutions from the model.
    pub fn new(layers: Vec<usize>) -> Self {
        Self {
            layers,
            causal: true,
        }
    }

    /// The same cell with centred ("same"-padded) convolutions, for a bidirectional encoder.
    pub fn bidirectional(mut self) -> Self {
        self.causal = false;
        self
    }

    pub fn is_causal(&self) -> bool {
        self.causal
    }

    pub fn layers(&self) -> &[usize] {
        &self.layers
    }

    /// The architecture weights, and their values when ops with weight exactly zero may be
    /// skipped.
    ///
    /// Skipping is only sound when no gradient flows into the weights: under straight-through,
    /// `d loss / d arch[e, op] = <grad, op(x)>` is needed for every op, including the zero-weight
    /// ones. `metapeft bench --workload tams-forward --workload tams-forward-all` measures the
    /// two paths on SmolLM2 (BENCHMARKS.md).
    fn arch(params: &ParamStore, dtype: DType) -> Result<(Tensor, Option<Vec<f64>>)> {
        let arch = params.get_opt(ARCH).ok_or_else(|| {
            Error::invalid(format!(
                "tams: no architecture `{ARCH}` in the delta's parameters: compute one with \
                 Controller::arch_weights (or Architecture::one_hot) and add it with tams::with_arch"
            ))
        })?;
        if arch.dims() != [NUM_EDGES, NUM_OPS] {
            return Err(Error::invalid(format!(
                "tams: `{ARCH}` must be [{NUM_EDGES}, {NUM_OPS}], got {:?}",
                arch.dims()
            )));
        }
        let arch = arch.to_dtype(dtype)?;
        let values = if arch.track_op() {
            None
        } else {
            Some(arch.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?)
        };
        Ok((arch, values))
    }

    /// The cell's contribution `[b, t, hidden]` in `layer`, from the FFN input `x` and output `ffn`.
    pub fn forward(
        &self,
        layer: usize,
        x: &Tensor,
        ffn: &Tensor,
        params: &ParamStore,
    ) -> Result<Tensor> {
        let p = |n: &str| params.get(&format!("tams.layers.{layer}.{n}"));
        let (arch, values) = Self::arch(params, x.dtype())?;
        let mut nodes = vec![
            linear(x, p("in_x.weight")?, None)?,
            linear(ffn, p("in_ffn.weight")?, None)?,
        ];
        for node in 2..5 {
            let mut acc: Option<Tensor> = None;
            for (e, &(_, from)) in EDGES.iter().enumerate().filter(|(_, (t, _))| *t == node) {
                // `none` contributes zero and its weight gets zero gradient: never computed.
                for op in &Op::ALL[1..] {
                    let o = op.index();
                    if values.as_ref().is_some_and(|v| v[e * NUM_OPS + o] == 0.0) {
                        continue;
                    }
                    let y = apply_op(*op, &nodes[from], layer, e, params, self.causal)?;
                    let y = y.broadcast_mul(&arch.i((e, o))?)?;
                    acc = Some(match acc {
                        Some(a) => (a + y)?,
                        None => y,
                    });
                }
            }
            nodes.push(match acc {
                Some(a) => a,
                None => nodes[0].zeros_like()?,
            });
        }
        let mean = ((&nodes[2] + &nodes[3])? + &nodes[4])?.affine(1.0 / 3.0, 0.0)?;
        Ok(linear(&mean, p("out.weight")?, None)?)
    }
}

/// One candidate op of edge `e` in `layer` on `x: [b, t, r]`.
fn apply_op(
    op: Op,
    x: &Tensor,
    layer: usize,
    e: usize,
    params: &ParamStore,
    causal: bool,
) -> Result<Tensor> {
    let p = |n: &str| params.get(&format!("tams.layers.{layer}.edges.{e}.{n}"));
    Ok(match op {
        Op::None => x.zeros_like()?,
        Op::Identity => x.clone(),
        Op::LinearRelu => linear(x, p("linear.weight")?, Some(p("linear.bias")?))?.relu()?,
        Op::Glu => {
            let h = linear(x, p("glu.weight")?, Some(p("glu.bias")?))?;
            let r = x.dim(2)?;
            let (a, g) = (h.narrow(2, 0, r)?, h.narrow(2, r, r)?);
            // sigmoid as 0.5 (1 + tanh(g / 2)): every step has a backward in candle.
            let gate = (g.affine(0.5, 0.0)?.tanh()? + 1.0)?.affine(0.5, 0.0)?;
            (a * gate)?
        }
        Op::Conv3Relu => conv1d(x, p("conv3.weight")?, p("conv3.bias")?, causal)?.relu()?,
        Op::Conv5Relu => conv1d(x, p("conv5.weight")?, p("conv5.bias")?, causal)?.relu()?,
    })
}

/// A causal 1-d convolution along the sequence: `x: [b, t, c_in]`, `w: [c_out, c_in, k]`
/// (PyTorch's `Conv1d` layout), left padding `k - 1`, so position `t` sees `t-k+1..=t` only.
///
/// Written as `k` shifted views stacked into one matmul: every step is differentiable in candle
/// (including second order), and with a frozen weight the matmul skips the weight gradient.
pub fn causal_conv1d(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    conv1d(x, w, b, true)
}

/// [`causal_conv1d`], or with `causal = false` centred: padding `(k-1)/2` on the left and the
/// rest on the right, so position `t` sees `t-(k-1)/2..=t+k/2` (an encoder's bidirectional view;
/// padded positions of a batch are read like any other, as in a plain `Conv1d`).
pub fn conv1d(x: &Tensor, w: &Tensor, b: &Tensor, causal: bool) -> Result<Tensor> {
    let (bs, t, c) = x.dims3()?;
    let (out, cin, k) = w.dims3()?;
    if cin != c {
        return Err(Error::invalid(format!(
            "tams: convolution weight {:?} does not fit {c} input channels",
            w.dims()
        )));
    }
    let left = if causal { k - 1 } else { (k - 1) / 2 };
    let padded = x.pad_with_zeros(1, left, k - 1 - left)?;
    let taps = (0..k)
        .map(|j| padded.narrow(1, j, t))
        .collect::<candle_core::Result<Vec<_>>>()?;
    // [b, t, c, k] flattens to index `c * k + j`, matching `w` flattened to [out, c * k].
    let cols = Tensor::stack(&taps, 3)?.reshape((bs, t, c * k))?;
    Ok(linear(&cols, &w.reshape((out, c * k))?, Some(b))?)
}

impl Delta for TamsCell {
    fn method(&self) -> &'static str {
        "tams"
    }

    fn mixes_positions(&self) -> bool {
        true
    }

    fn after_ffn(
        &self,
        layer: usize,
        x: &Tensor,
        out: Tensor,
        params: &ParamStore,
    ) -> Result<Tensor> {
        if !self.layers.contains(&layer) {
            return Ok(out);
        }
        let d = self.forward(layer, x, &out, params)?;
        Ok((out + d)?)
    }
}
