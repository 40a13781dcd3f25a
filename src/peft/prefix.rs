//! Prefix tuning (Li & Liang 2021) with PEFT's layout: every attention layer gets
//! `num_virtual_tokens` extra key/value positions. Trained through a reparameterisation MLP
//! (`embedding -> Linear -> tanh -> Linear`) which `fold` evaluates away, leaving PEFT's saved
//! form `prompt_embeddings: [n, layers * 2 * kv_heads * head_dim]`. Row `2l` of the per-token
//! `[layers * 2, kv_heads, head_dim]` view is layer `l`'s key, `2l + 1` its value. Real tokens'
//! positions start after the prefix, as with a key/value cache of that length.

use candle_core::{DType, Device, Tensor, Var};
use rand::{rngs::StdRng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::config::{check_exact, ModelDims};
use super::{normal, uniform, Delta};
use crate::ops::linear;
use crate::params::ParamStore;
use crate::{Error, Result};

fn yes() -> bool {
    true
}

fn hidden_default() -> usize {
    512
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrefixTuningConfig {
    pub num_virtual_tokens: usize,
    /// Train through the reparameterisation MLP (folded away at save).
    #[serde(default = "yes")]
    pub prefix_projection: bool,
    #[serde(default = "hidden_default")]
    pub encoder_hidden_size: usize,
}

const FOLDED: &str = "prompt_embeddings";
const EMB: &str = "prefix.embedding.weight";
const W1: &str = "prefix.transform.0.weight";
const B1: &str = "prefix.transform.0.bias";
const W2: &str = "prefix.transform.2.weight";
const B2: &str = "prefix.transform.2.bias";

#[derive(Debug)]
pub struct PrefixTuning {
    n: usize,
    dims: ModelDims,
    folded: bool,
}

fn kv_dim(d: ModelDims) -> usize {
    d.num_kv_heads * d.head_dim
}

impl PrefixTuning {
    pub fn init_params(cfg: &PrefixTuningConfig, dims: ModelDims, seed: u64) -> Result<ParamStore> {
        if cfg.num_virtual_tokens == 0 {
            return Err(Error::invalid(
                "prefix tuning: num_virtual_tokens must be at least 1",
            ));
        }
        let mut rng = StdRng::seed_from_u64(seed);
        let (n, kv, h) = (
            cfg.num_virtual_tokens,
            kv_dim(dims),
            cfg.encoder_hidden_size,
        );
        let out = dims.num_layers * 2 * kv;
        let dev = Device::Cpu;
        let mut p = ParamStore::new();
        let mut add = |name: &str, v: Vec<f32>, shape: Vec<usize>| -> Result<()> {
            p.insert_trainable(name, Var::from_tensor(&Tensor::from_vec(v, shape, &dev)?)?);
            Ok(())
        };
        if cfg.prefix_projection {
            // PEFT's modules: nn.Embedding N(0,1); nn.Linear Kaiming-uniform weights and biases.
            add(EMB, normal(&mut rng, n * kv, 1.0), vec![n, kv])?;
            add(
                W1,
                uniform(&mut rng, h * kv, 1.0 / (kv as f64).sqrt()),
                vec![h, kv],
            )?;
            add(B1, uniform(&mut rng, h, 1.0 / (kv as f64).sqrt()), vec![h])?;
            add(
                W2,
                uniform(&mut rng, out * h, 1.0 / (h as f64).sqrt()),
                vec![out, h],
            )?;
            add(
                B2,
                uniform(&mut rng, out, 1.0 / (h as f64).sqrt()),
                vec![out],
            )?;
        } else {
            add(FOLDED, normal(&mut rng, n * out, 1.0), vec![n, out])?;
        }
        Ok(p)
    }

    pub fn build(cfg: &PrefixTuningConfig, dims: ModelDims, params: &ParamStore) -> Result<Self> {
        let (n, kv, h) = (
            cfg.num_virtual_tokens,
            kv_dim(dims),
            cfg.encoder_hidden_size,
        );
        let out = dims.num_layers * 2 * kv;
        // A folded prefix (what PEFT saves) works whatever `prefix_projection` says.
        let folded = params.contains(FOLDED);
        let expected: Vec<(String, Vec<usize>)> = if folded {
            vec![(FOLDED.into(), vec![n, out])]
        } else {
            vec![
                (EMB.into(), vec![n, kv]),
                (W1.into(), vec![h, kv]),
                (B1.into(), vec![h]),
                (W2.into(), vec![out, h]),
                (B2.into(), vec![out]),
            ]
        };
        check_exact("prefix tuning", params, &expected)?;
        Ok(PrefixTuning { n, dims, folded })
    }

    /// `[n, layers * 2 * kv_dim]`: the prefix for every layer.
    pub fn folded(&self, params: &ParamStore) -> Result<Tensor> {
        if self.folded {
            return Ok(params.get(FOLDED)?.clone());
        }
        let e = params.get(EMB)?;
        let h = linear(e, params.get(W1)?, Some(params.get(B1)?))?.tanh()?;
        Ok(linear(&h, params.get(W2)?, Some(params.get(B2)?))?)
    }

    /// The parameters as PEFT saves them: the MLP evaluated away.
    pub fn fold(&self, params: &ParamStore) -> Result<ParamStore> {
        let mut p = ParamStore::new();
        p.insert_frozen(FOLDED, self.folded(params)?.detach().to_dtype(DType::F32)?);
        Ok(p)
    }
}

impl Delta for PrefixTuning {
    fn method(&self) -> &'static str {
        "prefix_tuning"
    }

    fn prefix_len(&self) -> usize {
        self.n
    }

    fn leaves_linear(&self, _module: &str) -> bool {
        true
    }

    fn attention_prefix(
        &self,
        layer: usize,
        batch: usize,
        params: &ParamStore,
    ) -> Result<Option<(Tensor, Tensor)>> {
        let d = self.dims;
        let all =
            self.folded(params)?
                .reshape((self.n, d.num_layers * 2, d.num_kv_heads, d.head_dim))?;
        let pick = |row: usize| -> Result<Tensor> {
            Ok(all
                .narrow(1, row, 1)?
                .squeeze(1)?
                .transpose(0, 1)?
                .unsqueeze(0)?
                .broadcast_as((batch, d.num_kv_heads, self.n, d.head_dim))?
                .contiguous()?)
        };
        Ok(Some((pick(2 * layer)?, pick(2 * layer + 1)?)))
    }
}
