//! LoRA (Hu et al. 2021): `y = x W^T + (alpha / r) * (x A^T) B^T`, with `A: [r, in]`, `B: [out, r]`.
//!
//! Parameter names follow Hugging Face PEFT (`<module>.lora_A.weight`), so export is a renaming.

use candle_core::{DType, Device, Tensor, Var};
use rand::{rngs::StdRng, Rng, SeedableRng};

use super::{linear_modules, Delta};
use crate::ops::linear;
use crate::params::ParamStore;
use crate::{Error, Result};

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f64,
    /// Module-name suffixes to adapt, e.g. `["q_proj", "v_proj"]`.
    pub target_modules: Vec<String>,
    /// PEFT's `init_lora_weights=False`: B random instead of zero (the delta is active at init).
    #[serde(default)]
    pub random_b: bool,
}

#[derive(Debug)]
pub struct Lora {
    scale: f64,
    modules: std::collections::HashSet<String>,
}

impl Lora {
    /// Create LoRA parameters for every matching linear module of `base`, as trainable `Var`s in a
    /// new store. `A` is Kaiming-uniform(a = sqrt 5) as in PEFT; `B` is zero unless `random_b`.
    pub fn init(
        cfg: &LoraConfig,
        base: &ParamStore,
        seed: u64,
        device: &Device,
    ) -> Result<(Self, ParamStore)> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut params = ParamStore::new();
        let mut modules = std::collections::HashSet::new();
        for (module, out, inp) in linear_modules(base) {
            let last = module.rsplit('.').next().unwrap_or(&module);
            if !cfg
                .target_modules
                .iter()
                .any(|t| t == last || module.ends_with(t.as_str()))
            {
                continue;
            }
            // kaiming_uniform_(a=sqrt(5)) on [r, in] gives bound = 1 / sqrt(in)
            let bound = 1.0 / (inp as f64).sqrt();
            let a: Vec<f32> = (0..cfg.r * inp)
                .map(|_| rng.random_range(-bound..bound) as f32)
                .collect();
            let b: Vec<f32> = if cfg.random_b {
                (0..out * cfg.r)
                    .map(|_| rng.random_range(-bound..bound) as f32)
                    .collect()
            } else {
                vec![0.0; out * cfg.r]
            };
            let a = Tensor::from_vec(a, (cfg.r, inp), device)?.to_dtype(DType::F32)?;
            let b = Tensor::from_vec(b, (out, cfg.r), device)?;
            params.insert_trainable(format!("{module}.lora_A.weight"), Var::from_tensor(&a)?);
            params.insert_trainable(format!("{module}.lora_B.weight"), Var::from_tensor(&b)?);
            modules.insert(module);
        }
        if modules.is_empty() {
            return Err(Error::invalid(format!(
                "LoRA target_modules {:?} match no linear layer of the model",
                cfg.target_modules
            )));
        }
        Ok((
            Lora {
                scale: cfg.lora_alpha / cfg.r as f64,
                modules,
            },
            params,
        ))
    }

    pub fn num_modules(&self) -> usize {
        self.modules.len()
    }
}

impl Delta for Lora {
    fn linear(&self, module: &str, x: &Tensor, y: Tensor, params: &ParamStore) -> Result<Tensor> {
        if !self.modules.contains(module) {
            return Ok(y);
        }
        let a = params.get(&format!("{module}.lora_A.weight"))?;
        let b = params.get(&format!("{module}.lora_B.weight"))?;
        let h = linear(&x.to_dtype(a.dtype())?, a, None)?;
        let d = (linear(&h, b, None)? * self.scale)?;
        let d = d.to_dtype(y.dtype())?;
        Ok((y + d)?)
    }
}
