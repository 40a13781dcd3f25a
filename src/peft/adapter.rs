//! Bottleneck adapters: a small `down -> activation -> up` MLP on a sublayer's output.
//! - Houlsby et al. 2019: after the attention and after the FFN sublayer, `h + f(h)`;
//! - Pfeiffer et al. 2021: after the FFN sublayer only;
//! - parallel (He et al. 2022): beside the FFN, `ffn(x) + s * f(x)` on the FFN's input.
//!
//! The bottleneck is `hidden / reduction_factor` wide. Near-identity init: both projections
//! N(0, 0.01), biases zero, so `f` starts close to 0.

use candle_core::{Device, Tensor, Var};
use rand::{rngs::StdRng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::config::{check_exact, ModelDims};
use super::{normal, Delta};
use crate::ops::{self, linear};
use crate::params::ParamStore;
use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdapterKind {
    Houlsby,
    Pfeiffer,
    Parallel,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    Relu,
    Gelu,
    Silu,
    Tanh,
}

fn sixteen() -> usize {
    16
}
fn relu() -> Activation {
    Activation::Relu
}
fn one() -> f64 {
    1.0
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BottleneckConfig {
    pub kind: AdapterKind,
    #[serde(default = "sixteen")]
    pub reduction_factor: usize,
    #[serde(default = "relu")]
    pub activation: Activation,
    /// The parallel adapter's output scale `s`.
    #[serde(default = "one")]
    pub scaling: f64,
}

impl BottleneckConfig {
    fn sites(&self) -> &'static [&'static str] {
        match self.kind {
            AdapterKind::Houlsby => &["attn", "ffn"],
            AdapterKind::Pfeiffer | AdapterKind::Parallel => &["ffn"],
        }
    }

    fn expected(&self, d: ModelDims) -> Result<Vec<(String, Vec<usize>)>> {
        if self.reduction_factor == 0 || d.hidden / self.reduction_factor == 0 {
            return Err(Error::invalid(format!(
                "adapter: reduction_factor {} leaves no bottleneck for hidden size {}",
                self.reduction_factor, d.hidden
            )));
        }
        let b = d.hidden / self.reduction_factor;
        let mut e = vec![];
        for i in 0..d.num_layers {
            for site in self.sites() {
                let p = format!("{}.{i}.adapter_{site}", d.layer_prefix);
                e.push((format!("{p}.down.weight"), vec![b, d.hidden]));
                e.push((format!("{p}.down.bias"), vec![b]));
                e.push((format!("{p}.up.weight"), vec![d.hidden, b]));
                e.push((format!("{p}.up.bias"), vec![d.hidden]));
            }
        }
        Ok(e)
    }
}

#[derive(Debug)]
pub struct Bottleneck {
    cfg: BottleneckConfig,
    prefix: &'static str,
}

impl Bottleneck {
    pub fn init_params(cfg: &BottleneckConfig, dims: ModelDims, seed: u64) -> Result<ParamStore> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut p = ParamStore::new();
        for (name, shape) in cfg.expected(dims)? {
            let n: usize = shape.iter().product();
            let v = if name.ends_with("weight") {
                normal(&mut rng, n, 0.01)
            } else {
                vec![0.0; n]
            };
            p.insert_trainable(
                name,
                Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu)?)?,
            );
        }
        Ok(p)
    }

    pub fn build(cfg: &BottleneckConfig, dims: ModelDims, params: &ParamStore) -> Result<Self> {
        check_exact("adapter", params, &cfg.expected(dims)?)?;
        Ok(Bottleneck {
            cfg: cfg.clone(),
            prefix: dims.layer_prefix,
        })
    }

    fn f(&self, layer: usize, site: &str, h: &Tensor, params: &ParamStore) -> Result<Tensor> {
        let p = format!("{}.{layer}.adapter_{site}", self.prefix);
        let get = |n: &str| params.get(&format!("{p}.{n}"));
        let z = linear(h, get("down.weight")?, Some(get("down.bias")?))?;
        let z = match self.cfg.activation {
            Activation::Relu => z.relu()?,
            Activation::Gelu => ops::gelu(&z)?,
            Activation::Silu => ops::silu(&z)?,
            Activation::Tanh => z.tanh()?,
        };
        Ok(linear(&z, get("up.weight")?, Some(get("up.bias")?))?)
    }
}

impl Delta for Bottleneck {
    fn method(&self) -> &'static str {
        "adapter"
    }

    fn after_attention(&self, layer: usize, h: Tensor, params: &ParamStore) -> Result<Tensor> {
        if self.cfg.kind != AdapterKind::Houlsby {
            return Ok(h);
        }
        let f = self.f(layer, "attn", &h, params)?;
        Ok((h + f)?)
    }

    fn after_ffn(
        &self,
        layer: usize,
        x: &Tensor,
        out: Tensor,
        params: &ParamStore,
    ) -> Result<Tensor> {
        match self.cfg.kind {
            AdapterKind::Parallel => {
                let f = (self.f(layer, "ffn", x, params)? * self.cfg.scaling)?;
                Ok((out + f)?)
            }
            _ => {
                let f = self.f(layer, "ffn", &out, params)?;
                Ok((out + f)?)
            }
        }
    }
}
