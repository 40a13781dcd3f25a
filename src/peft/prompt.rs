//! Prompt tuning (Lester et al. 2021): `num_virtual_tokens` trainable embeddings prepended to the
//! input embeddings (PEFT's `prompt_embeddings: [n, d]`). The model drops their output positions,
//! so callers see one output per real token.

use candle_core::{Device, Tensor, Var};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::config::{check_exact, ModelDims};
use super::Delta;
use crate::params::ParamStore;
use crate::{Error, Result};

fn random() -> String {
    "RANDOM".into()
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PromptTuningConfig {
    pub num_virtual_tokens: usize,
    /// `RANDOM`: copies of randomly chosen vocabulary embeddings (a well-scaled start);
    /// `ZEROS` is not offered: a zero prompt has no gradient signal through attention scores.
    #[serde(default = "random")]
    pub prompt_tuning_init: String,
}

pub const EMBEDDING_NAMES: [&str; 2] = [
    "model.embed_tokens.weight",
    "embeddings.word_embeddings.weight",
];

#[derive(Debug)]
pub struct PromptTuning {
    n: usize,
}

impl PromptTuning {
    pub fn init_params(
        cfg: &PromptTuningConfig,
        base: &ParamStore,
        dims: ModelDims,
        seed: u64,
    ) -> Result<ParamStore> {
        if cfg.num_virtual_tokens == 0 {
            return Err(Error::invalid(
                "prompt tuning: num_virtual_tokens must be at least 1",
            ));
        }
        if cfg.prompt_tuning_init != "RANDOM" {
            return Err(Error::invalid(format!(
                "prompt tuning: prompt_tuning_init `{}` is not supported (RANDOM)",
                cfg.prompt_tuning_init
            )));
        }
        let emb = EMBEDDING_NAMES
            .iter()
            .find_map(|n| base.get_opt(n))
            .ok_or_else(|| {
                Error::invalid("prompt tuning: the base model has no token embedding")
            })?;
        let vocab = emb.dim(0)?;
        let mut rng = StdRng::seed_from_u64(seed);
        let rows: Vec<u32> = (0..cfg.num_virtual_tokens)
            .map(|_| rng.random_range(0..vocab as u32))
            .collect();
        let init = emb
            .index_select(&Tensor::new(rows.as_slice(), &Device::Cpu)?, 0)?
            .to_dtype(candle_core::DType::F32)?;
        debug_assert_eq!(init.dim(1)?, dims.hidden);
        let mut p = ParamStore::new();
        p.insert_trainable("prompt_embeddings", Var::from_tensor(&init)?);
        Ok(p)
    }

    pub fn build(cfg: &PromptTuningConfig, dims: ModelDims, params: &ParamStore) -> Result<Self> {
        check_exact(
            "prompt tuning",
            params,
            &[(
                "prompt_embeddings".into(),
                vec![cfg.num_virtual_tokens, dims.hidden],
            )],
        )?;
        Ok(PromptTuning {
            n: cfg.num_virtual_tokens,
        })
    }
}

impl Delta for PromptTuning {
    fn method(&self) -> &'static str {
        "prompt_tuning"
    }

    fn virtual_tokens(&self) -> usize {
        self.n
    }

    fn leaves_linear(&self, _module: &str) -> bool {
        true
    }

    fn input_embeddings(&self, x: Tensor, params: &ParamStore) -> Result<Tensor> {
        let (b, _, d) = x.dims3()?;
        let p = params
            .get("prompt_embeddings")?
            .to_dtype(x.dtype())?
            .unsqueeze(0)?
            .broadcast_as((b, self.n, d))?;
        Ok(Tensor::cat(&[&p, &x], 1)?)
    }
}
