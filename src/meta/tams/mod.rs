//! TAMS, task-adaptive model search (Hou, Salazar & Polovets 2022, section 3.3).
//!
//! A DARTS-style cell sits in the FFN residual of every (chosen) layer. Its operation weights are
//! shared by all tasks; what changes per task is the architecture, a `[9 edges, 6 ops]` weight
//! matrix produced by a small controller from a task embedding (the mean token embedding of the
//! support set). With straight-through hard one-hot weights each task runs one discrete cell,
//! while the controller still receives the gradient of the soft mixture.
//!
//! - [`cell`]: the cell as a [`crate::peft::Delta`] acting through `after_ffn`;
//! - [`controller`]: task embedding and `FC(d->h)-ReLU-FC(h->54)` with a softmax per edge;
//! - [`Architecture`]: the discrete choice per edge (printable, serde, back to a one-hot tensor).
//!
//! Every parameter lives in one [`ParamStore`] under `tams.*`; the per-task architecture is read
//! from the same store under [`ARCH`], so a task's forward is just "the shared store plus its arch"
//! (see [`with_arch`]) and inner-loop fast weights stay an ordinary store.

pub mod cell;
pub mod controller;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use rand::{rngs::StdRng, SeedableRng};
use serde::{Deserialize, Serialize};

pub use cell::TamsCell;
pub use controller::{straight_through, task_embedding, ArchMode, Controller};

use crate::params::ParamStore;
use crate::peft::config::ModelDims;
use crate::peft::uniform;
use crate::{Error, Result};

/// Intermediate nodes 2, 3, 4 take one edge from every earlier node.
pub const NUM_EDGES: usize = 9;
pub const NUM_OPS: usize = 6;
/// `(target node, source node)` of each edge, in the order of the architecture's rows.
pub const EDGES: [(usize, usize); NUM_EDGES] = [
    (2, 0),
    (2, 1),
    (3, 0),
    (3, 1),
    (3, 2),
    (4, 0),
    (4, 1),
    (4, 2),
    (4, 3),
];
/// The name of the `[9, 6]` architecture weights in the delta's parameter store.
pub const ARCH: &str = "tams.arch";
/// The file holding each task's discrete architecture next to a prepared model.
pub const ARCHITECTURES_FILE: &str = "tams_architectures.json";

/// The candidate operations on an edge, in the order of the architecture's columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    None,
    Identity,
    LinearRelu,
    Glu,
    Conv3Relu,
    Conv5Relu,
}

impl Op {
    pub const ALL: [Op; NUM_OPS] = [
        Op::None,
        Op::Identity,
        Op::LinearRelu,
        Op::Glu,
        Op::Conv3Relu,
        Op::Conv5Relu,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Op::None => "none",
            Op::Identity => "identity",
            Op::LinearRelu => "linear_relu",
            Op::Glu => "glu",
            Op::Conv3Relu => "conv3_relu",
            Op::Conv5Relu => "conv5_relu",
        }
    }

    /// Its column in the architecture weights.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The causal convolution width, for the convolution ops.
    pub fn kernel(self) -> Option<usize> {
        match self {
            Op::Conv3Relu => Some(3),
            Op::Conv5Relu => Some(5),
            _ => None,
        }
    }
}

fn sixty_four() -> usize {
    64
}
fn one_twenty_eight() -> usize {
    128
}
fn yes() -> bool {
    true
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TamsConfig {
    /// Width of the cell's nodes (the projections go hidden -> reduced -> hidden).
    #[serde(default = "sixty_four")]
    pub reduced_dim: usize,
    /// Width of the controller's hidden layer.
    #[serde(default = "one_twenty_eight")]
    pub controller_hidden: usize,
    /// Gumbel-softmax temperature; noise is added only when a caller passes an RNG (training).
    #[serde(default)]
    pub gumbel_temperature: Option<f64>,
    /// Layers that get a cell (default: all).
    #[serde(default)]
    pub layers: Option<Vec<usize>>,
    /// Straight-through hard one-hot architectures (the paper's choice) rather than soft mixtures.
    #[serde(default = "yes")]
    pub hard: bool,
}

impl Default for TamsConfig {
    fn default() -> Self {
        Self {
            reduced_dim: 64,
            controller_hidden: 128,
            gumbel_temperature: None,
            layers: None,
            hard: true,
        }
    }
}

impl TamsConfig {
    /// The layers that get a cell, checked against the model.
    pub fn layer_list(&self, dims: ModelDims) -> Result<Vec<usize>> {
        let layers = match &self.layers {
            None => (0..dims.num_layers).collect(),
            Some(l) => l.clone(),
        };
        if let Some(bad) = layers.iter().find(|&&l| l >= dims.num_layers) {
            return Err(Error::invalid(format!(
                "tams: layer {bad} does not exist (the model has {} layers)",
                dims.num_layers
            )));
        }
        Ok(layers)
    }

    /// Every cell and controller tensor with its shape (the architecture is not a parameter).
    pub fn expected(&self, dims: ModelDims) -> Result<Vec<(String, Vec<usize>)>> {
        let (r, d, h) = (self.reduced_dim, dims.hidden, self.controller_hidden);
        if r == 0 || h == 0 {
            return Err(Error::invalid(
                "tams: reduced_dim and controller_hidden must be positive",
            ));
        }
        if let Some(t) = self.gumbel_temperature {
            if t.is_nan() || t <= 0.0 {
                return Err(Error::invalid(format!(
                    "tams: gumbel_temperature must be positive, got {t}"
                )));
            }
        }
        let mut e = vec![];
        for i in self.layer_list(dims)? {
            let p = format!("tams.layers.{i}");
            e.push((format!("{p}.in_x.weight"), vec![r, d]));
            e.push((format!("{p}.in_ffn.weight"), vec![r, d]));
            e.push((format!("{p}.out.weight"), vec![d, r]));
            for j in 0..NUM_EDGES {
                let q = format!("{p}.edges.{j}");
                e.push((format!("{q}.linear.weight"), vec![r, r]));
                e.push((format!("{q}.linear.bias"), vec![r]));
                e.push((format!("{q}.glu.weight"), vec![2 * r, r]));
                e.push((format!("{q}.glu.bias"), vec![2 * r]));
                e.push((format!("{q}.conv3.weight"), vec![r, r, 3]));
                e.push((format!("{q}.conv3.bias"), vec![r]));
                e.push((format!("{q}.conv5.weight"), vec![r, r, 5]));
                e.push((format!("{q}.conv5.bias"), vec![r]));
            }
        }
        e.push(("tams.controller.fc1.weight".into(), vec![h, d]));
        e.push(("tams.controller.fc1.bias".into(), vec![h]));
        e.push((
            "tams.controller.fc2.weight".into(),
            vec![NUM_EDGES * NUM_OPS, h],
        ));
        e.push(("tams.controller.fc2.bias".into(), vec![NUM_EDGES * NUM_OPS]));
        Ok(e)
    }

    /// Fresh trainable cell and controller parameters (f32). Weights are uniform in
    /// `+-1/sqrt(fan_in)` (PyTorch's default), biases zero, and the cell's output projection zero,
    /// so a fresh cell leaves the model unchanged whatever the architecture. `base` must hold the
    /// token embeddings the task embedding is read from.
    pub fn init(&self, dims: ModelDims, base: &ParamStore, seed: u64) -> Result<ParamStore> {
        let emb = embedding_name(base)?;
        let width = base.get(emb)?.dim(1)?;
        if width != dims.hidden {
            return Err(Error::invalid(format!(
                "tams: `{emb}` is {width} wide but the model's hidden size is {}",
                dims.hidden
            )));
        }
        let mut rng = StdRng::seed_from_u64(seed);
        let mut p = ParamStore::new();
        for (name, shape) in self.expected(dims)? {
            let n: usize = shape.iter().product();
            let fan_in: usize = shape[1..].iter().product();
            let v = if name.ends_with(".bias") || name.ends_with(".out.weight") {
                vec![0.0; n]
            } else {
                uniform(&mut rng, n, 1.0 / (fan_in as f64).sqrt())
            };
            let t = Tensor::from_vec(v, shape, &Device::Cpu)?;
            p.insert_trainable(name, Var::from_tensor(&t)?);
        }
        Ok(p)
    }

    /// The cell and the controller over existing parameters, checking every name and shape. An
    /// architecture ([`ARCH`]) may already be in the store; it is checked too.
    pub fn build(&self, dims: ModelDims, params: &ParamStore) -> Result<(TamsCell, Controller)> {
        let mut expected = self.expected(dims)?;
        if params.contains(ARCH) {
            expected.push((ARCH.into(), vec![NUM_EDGES, NUM_OPS]));
        }
        check_exact(params, &expected)?;
        let cell = TamsCell::new(self.layer_list(dims)?);
        // Encoders (BERT's `encoder.layer`) attend both ways: their convolutions do too.
        let cell = if dims.layer_prefix == "encoder.layer" {
            cell.bidirectional()
        } else {
            cell
        };
        Ok((cell, Controller::new(self.gumbel_temperature)))
    }
}

/// Check that `params` holds exactly `expected` (names and shapes); name the first misfit.
fn check_exact(params: &ParamStore, expected: &[(String, Vec<usize>)]) -> Result<()> {
    for (name, shape) in expected {
        let t = params.get_opt(name).ok_or_else(|| {
            Error::invalid(format!(
                "tams: missing tensor `{name}` (shape {shape:?}); was the store made with the same TamsConfig?"
            ))
        })?;
        if t.dims() != shape.as_slice() {
            return Err(Error::invalid(format!(
                "tams: tensor `{name}` has shape {:?}, expected {shape:?}",
                t.dims()
            )));
        }
    }
    if params.len() != expected.len() {
        let known: std::collections::HashSet<&str> =
            expected.iter().map(|(n, _)| n.as_str()).collect();
        if let Some(extra) = params.names().find(|n| !known.contains(n)) {
            return Err(Error::invalid(format!(
                "tams: unexpected tensor `{extra}` (another configuration or model?)"
            )));
        }
    }
    Ok(())
}

/// The token-embedding matrix of a Llama or BERT base store.
pub(crate) fn embedding_name(base: &ParamStore) -> Result<&'static str> {
    [
        "model.embed_tokens.weight",
        "embeddings.word_embeddings.weight",
    ]
    .into_iter()
    .find(|n| base.contains(n))
    .ok_or_else(|| {
        Error::invalid(
            "tams: the base store has no token embeddings (`model.embed_tokens.weight` or \
                 `embeddings.word_embeddings.weight`) to build a task embedding from",
        )
    })
}

/// A copy of `params` (cheap: tensors are shared) with `arch: [9, 6]` as the architecture. The
/// arch may carry a graph back to the controller.
pub fn with_arch(params: &ParamStore, arch: Tensor) -> Result<ParamStore> {
    if arch.dims() != [NUM_EDGES, NUM_OPS] {
        return Err(Error::invalid(format!(
            "tams: architecture weights must be [{NUM_EDGES}, {NUM_OPS}], got {:?}",
            arch.dims()
        )));
    }
    let mut p = params.clone();
    p.insert_frozen(ARCH, arch);
    Ok(p)
}

/// The discrete choice of operation on each edge.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Architecture {
    pub edges: [Op; NUM_EDGES],
}

impl Architecture {
    /// The argmax op of each edge of `[9, 6]` weights (soft, hard or one-hot; ties pick the
    /// first op).
    pub fn from_weights(w: &Tensor) -> Result<Self> {
        if w.dims() != [NUM_EDGES, NUM_OPS] {
            return Err(Error::invalid(format!(
                "tams: architecture weights must be [{NUM_EDGES}, {NUM_OPS}], got {:?}",
                w.dims()
            )));
        }
        let rows: Vec<Vec<f64>> = w.detach().to_dtype(DType::F64)?.to_vec2()?;
        let mut edges = [Op::None; NUM_EDGES];
        for (e, row) in rows.iter().enumerate() {
            if row.iter().any(|v| v.is_nan()) {
                return Err(Error::invalid(format!(
                    "tams: architecture weights of edge {e} contain NaN"
                )));
            }
            let best = (0..NUM_OPS).fold(0, |b, o| if row[o] > row[b] { o } else { b });
            edges[e] = Op::ALL[best];
        }
        Ok(Self { edges })
    }

    /// The fixed one-hot `[9, 6]` weights of this architecture.
    pub fn one_hot(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        let mut v = vec![0f64; NUM_EDGES * NUM_OPS];
        for (e, op) in self.edges.iter().enumerate() {
            v[e * NUM_OPS + op.index()] = 1.0;
        }
        Ok(Tensor::from_vec(v, (NUM_EDGES, NUM_OPS), device)?.to_dtype(dtype)?)
    }

    /// Whether any selected op mixes sequence positions.
    pub fn uses_convolution(&self) -> bool {
        self.edges.iter().any(|op| op.kernel().is_some())
    }
}

impl fmt::Display for Architecture {
    /// `node2 <- 0:glu, 1:none | node3 <- 0:identity, 1:none, 2:conv3_relu | node4 <- ...`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for node in 2..5 {
            if node > 2 {
                write!(f, " | ")?;
            }
            write!(f, "node{node} <-")?;
            let incoming = EDGES.iter().enumerate().filter(|(_, (to, _))| *to == node);
            for (k, (e, (_, from))) in incoming.enumerate() {
                let sep = if k == 0 { " " } else { ", " };
                write!(f, "{sep}{from}:{}", self.edges[e].name())?;
            }
        }
        Ok(())
    }
}

/// Save each task's architecture (`task name -> architecture`) as JSON in `dir`, next to the
/// prepared model's other files.
pub fn write_architectures(dir: &Path, archs: &BTreeMap<String, Architecture>) -> Result<()> {
    let text = serde_json::to_string_pretty(archs)
        .map_err(|e| Error::invalid(format!("tams: cannot serialise architectures: {e}")))?;
    crate::io::write_atomic(&dir.join(ARCHITECTURES_FILE), text.as_bytes())
}

pub fn read_architectures(dir: &Path) -> Result<BTreeMap<String, Architecture>> {
    let path = dir.join(ARCHITECTURES_FILE);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Error::file(&path, format!("cannot read: {e}")))?;
    serde_json::from_str(&text).map_err(|e| Error::file(&path, format!("bad architectures: {e}")))
}
