//! Delta configurations (serde, one variant per method) and adapters: a configuration plus its
//! parameters, the unit that is trained, saved, loaded and attached.

use serde::{Deserialize, Serialize};

use super::adapter::{Bottleneck, BottleneckConfig};
use super::bitfit::{BitFit, BitFitConfig};
use super::ia3::{Ia3, Ia3Config};
use super::ln_tuning::{LnTuning, LnTuningConfig};
use super::lora::{Lora, LoraConfig};
use super::prefix::{PrefixTuning, PrefixTuningConfig};
use super::prompt::{PromptTuning, PromptTuningConfig};
use super::tarp::{Tarp, TarpConfig};
use super::{Delta, DeltaSet};
use crate::model::Arch;
use crate::params::ParamStore;
use crate::{Error, Result};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum DeltaConfig {
    Lora(LoraConfig),
    Ia3(Ia3Config),
    PromptTuning(PromptTuningConfig),
    PrefixTuning(PrefixTuningConfig),
    Bitfit(BitFitConfig),
    LnTuning(LnTuningConfig),
    Tarp(TarpConfig),
    Adapter(BottleneckConfig),
}

/// The sizes a delta needs to know about its base model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModelDims {
    /// Where layer `i`'s modules live: `<layer_prefix>.<i>.` (`model.layers`, `encoder.layer`).
    pub layer_prefix: &'static str,
    pub num_layers: usize,
    pub hidden: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl ModelDims {
    pub fn of(arch: &Arch) -> Self {
        match arch {
            Arch::Llama(c) => ModelDims {
                layer_prefix: "model.layers",
                num_layers: c.num_hidden_layers,
                hidden: c.hidden_size,
                num_kv_heads: c.num_key_value_heads,
                head_dim: c.head_dim,
            },
            Arch::Bert(c) => ModelDims {
                layer_prefix: "encoder.layer",
                num_layers: c.num_hidden_layers,
                hidden: c.hidden_size,
                num_kv_heads: c.num_attention_heads,
                head_dim: c.hidden_size / c.num_attention_heads,
            },
        }
    }
}

impl DeltaConfig {
    pub fn method(&self) -> &'static str {
        match self {
            DeltaConfig::Lora(_) => "lora",
            DeltaConfig::Ia3(_) => "ia3",
            DeltaConfig::PromptTuning(_) => "prompt_tuning",
            DeltaConfig::PrefixTuning(_) => "prefix_tuning",
            DeltaConfig::Bitfit(_) => "bitfit",
            DeltaConfig::LnTuning(_) => "ln_tuning",
            DeltaConfig::Tarp(_) => "tarp",
            DeltaConfig::Adapter(_) => "adapter",
        }
    }

    /// Fresh trainable parameters for this configuration on `base`, from `seed`.
    pub fn init(&self, arch: &Arch, base: &ParamStore, seed: u64) -> Result<Adapter> {
        let dims = ModelDims::of(arch);
        let params = match self {
            DeltaConfig::Lora(c) => Lora::init_params(c, base, seed)?,
            DeltaConfig::Ia3(c) => Ia3::init_params(c, base, seed)?,
            DeltaConfig::PromptTuning(c) => PromptTuning::init_params(c, base, dims, seed)?,
            DeltaConfig::PrefixTuning(c) => PrefixTuning::init_params(c, dims, seed)?,
            DeltaConfig::Bitfit(c) => BitFit::init_params(c, base)?,
            DeltaConfig::LnTuning(c) => LnTuning::init_params(c, base)?,
            DeltaConfig::Tarp(c) => Tarp::init_params(c, base, seed)?,
            DeltaConfig::Adapter(c) => Bottleneck::init_params(c, dims, seed)?,
        };
        Ok(Adapter {
            config: self.clone(),
            params,
        })
    }

    /// Build the delta over existing parameters, checking every tensor against the base model.
    pub fn build(
        &self,
        arch: &Arch,
        base: &ParamStore,
        params: &ParamStore,
    ) -> Result<Box<dyn Delta>> {
        let dims = ModelDims::of(arch);
        Ok(match self {
            DeltaConfig::Lora(c) => Box::new(Lora::build(c, base, params)?),
            DeltaConfig::Ia3(c) => Box::new(Ia3::build(c, base, params)?),
            DeltaConfig::PromptTuning(c) => Box::new(PromptTuning::build(c, dims, params)?),
            DeltaConfig::PrefixTuning(c) => Box::new(PrefixTuning::build(c, dims, params)?),
            DeltaConfig::Bitfit(c) => Box::new(BitFit::build(c, base, params)?),
            DeltaConfig::LnTuning(c) => Box::new(LnTuning::build(c, base, params)?),
            DeltaConfig::Tarp(c) => Box::new(Tarp::build(c, base, params)?),
            DeltaConfig::Adapter(c) => Box::new(Bottleneck::build(c, dims, params)?),
        })
    }
}

/// A delta's configuration and parameters.
#[derive(Clone, Debug)]
pub struct Adapter {
    pub config: DeltaConfig,
    pub params: ParamStore,
}

impl Adapter {
    /// A delta set holding this adapter, checked against the base model.
    pub fn attach(&self, arch: &Arch, base: &ParamStore) -> Result<DeltaSet> {
        let mut set = DeltaSet::none();
        set.push_boxed(self.config.build(arch, base, &self.params)?);
        Ok(set)
    }

    /// Adapter parameters and the base model's parameters, in number of scalars.
    pub fn summary(&self, base: &ParamStore) -> (usize, usize) {
        (self.params.num_params(), base.num_params())
    }
}

/// Check that `params` holds exactly `expected` (names and shapes); name the first misfit.
pub(crate) fn check_exact(
    method: &str,
    params: &ParamStore,
    expected: &[(String, Vec<usize>)],
) -> Result<()> {
    for (name, shape) in expected {
        let t = params.get_opt(name).ok_or_else(|| {
            Error::invalid(format!(
                "{method} adapter: missing tensor `{name}` (the base model has this module)"
            ))
        })?;
        if t.dims() != shape.as_slice() {
            return Err(Error::invalid(format!(
                "{method} adapter: tensor `{name}` has shape {:?}, the base model needs {:?}",
                t.dims(),
                shape
            )));
        }
    }
    if params.len() != expected.len() {
        let known: std::collections::HashSet<&str> =
            expected.iter().map(|(n, _)| n.as_str()).collect();
        if let Some(extra) = params.names().find(|n| !known.contains(n)) {
            return Err(Error::invalid(format!(
                "{method} adapter: tensor `{extra}` matches no module of this base model (an adapter for another model?)"
            )));
        }
    }
    Ok(())
}

/// The methods that can be named on the command line.
pub const METHODS: [&str; 6] = [
    "lora",
    "ia3",
    "prompt_tuning",
    "prefix_tuning",
    "bitfit",
    "ln_tuning",
];

/// A sensible default configuration of `method` for `arch` (the usual PEFT targets).
pub fn default_config(method: &str, arch: &Arch) -> Result<DeltaConfig> {
    use super::targets::TargetModules;
    let list = |v: &[&str]| TargetModules::List(v.iter().map(|s| s.to_string()).collect());
    let decoder = matches!(arch, Arch::Llama(_));
    Ok(match method.replace('-', "_").as_str() {
        "lora" => DeltaConfig::Lora(LoraConfig::new(
            8,
            16.0,
            if decoder {
                &["q_proj", "v_proj"]
            } else {
                &["query", "value"]
            },
        )),
        "ia3" => DeltaConfig::Ia3(super::ia3::Ia3Config {
            target_modules: if decoder {
                list(&["k_proj", "v_proj", "down_proj"])
            } else {
                list(&["key", "value", "output.dense"])
            },
            feedforward_modules: if decoder {
                list(&["down_proj"])
            } else {
                list(&["output.dense"])
            },
            init_ia3_weights: true,
        }),
        "prompt" | "prompt_tuning" => DeltaConfig::PromptTuning(PromptTuningConfig {
            num_virtual_tokens: 20,
            prompt_tuning_init: "RANDOM".into(),
        }),
        "prefix" | "prefix_tuning" => DeltaConfig::PrefixTuning(PrefixTuningConfig {
            num_virtual_tokens: 20,
            prefix_projection: true,
            encoder_hidden_size: 512,
        }),
        "tarp" => DeltaConfig::Tarp(TarpConfig {
            variant: super::tarp::TarpVariant::Bilinear,
            r: 8,
            target_modules: if decoder {
                list(&["q_proj", "v_proj", "down_proj"])
            } else {
                list(&["query", "value", "output.dense"])
            },
            multiplicative: false,
            kron_n: 2,
        }),
        "adapter" | "houlsby" | "pfeiffer" | "parallel" => DeltaConfig::Adapter(BottleneckConfig {
            kind: match method {
                "pfeiffer" => super::adapter::AdapterKind::Pfeiffer,
                "parallel" => super::adapter::AdapterKind::Parallel,
                _ => super::adapter::AdapterKind::Houlsby,
            },
            reduction_factor: 16,
            activation: super::adapter::Activation::Relu,
            scaling: 1.0,
        }),
        "bitfit" => DeltaConfig::Bitfit(BitFitConfig::default()),
        "ln_tuning" | "layernorm" => DeltaConfig::LnTuning(LnTuningConfig::default()),
        other => {
            return Err(Error::invalid(format!(
                "unknown method `{other}` (known: {})",
                METHODS.join(", ")
            )))
        }
    })
}

/// Read a delta configuration from a JSON or TOML file (`method = "lora"` plus the method's
/// fields).
pub fn config_from_file(path: &std::path::Path) -> Result<DeltaConfig> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
    let is_toml = path.extension().is_some_and(|e| e == "toml");
    if is_toml {
        toml::from_str(&text).map_err(|e| Error::file(path, format!("bad delta config: {e}")))
    } else {
        serde_json::from_str(&text).map_err(|e| Error::file(path, format!("bad delta config: {e}")))
    }
}
