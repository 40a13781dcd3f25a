//! Hugging Face PEFT's adapter format: `adapter_config.json` and `adapter_model.safetensors`,
//! with tensors named `base_model.model.<module>.lora_A.weight` (`[r, in]`), `.lora_B.weight`
//! (`[out, r]`), `<module>.ia3_l` and `prompt_embeddings`. Covers LoRA, (IA)3, prompt tuning and
//! prefix tuning (saved folded, as PEFT does). `PeftModel.from_pretrained` loads what this writes,
//! and this reads what PEFT writes.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;

use super::{load_safetensors, save_safetensors, write_atomic};
use crate::model::Arch;
use crate::params::ParamStore;
use crate::peft::config::ModelDims;
use crate::peft::ia3::Ia3Config;
use crate::peft::lora::LoraConfig;
use crate::peft::prefix::{PrefixTuning, PrefixTuningConfig};
use crate::peft::prompt::PromptTuningConfig;
use crate::peft::{Adapter, DeltaConfig};
use crate::{Error, Result};

pub const CONFIG: &str = "adapter_config.json";
pub const WEIGHTS: &str = "adapter_model.safetensors";
const PREFIX: &str = "base_model.model.";

fn task_type(arch: &Arch) -> &'static str {
    match arch {
        Arch::Llama(_) => "CAUSAL_LM",
        Arch::Bert(_) => "FEATURE_EXTRACTION",
    }
}

pub fn write(adapter: &Adapter, arch: &Arch, base_model: &str, dir: &Path) -> Result<()> {
    let dims = ModelDims::of(arch);
    let mut cfg = match &adapter.config {
        DeltaConfig::Lora(c) => {
            let mut v = serde_json::to_value(c).unwrap_or_default();
            v["peft_type"] = "LORA".into();
            v["fan_in_fan_out"] = false.into();
            v["modules_to_save"] = serde_json::Value::Null;
            v
        }
        DeltaConfig::Ia3(c) => {
            let mut v = serde_json::to_value(c).unwrap_or_default();
            v["peft_type"] = "IA3".into();
            v["fan_in_fan_out"] = false.into();
            v["modules_to_save"] = serde_json::Value::Null;
            v
        }
        DeltaConfig::PromptTuning(c) => serde_json::json!({
            "peft_type": "PROMPT_TUNING",
            "num_virtual_tokens": c.num_virtual_tokens,
            "token_dim": dims.hidden,
            "num_transformer_submodules": 1,
            "num_layers": dims.num_layers,
            "prompt_tuning_init": "RANDOM",
        }),
        DeltaConfig::PrefixTuning(c) => serde_json::json!({
            "peft_type": "PREFIX_TUNING",
            "num_virtual_tokens": c.num_virtual_tokens,
            "token_dim": dims.num_kv_heads * dims.head_dim,
            "num_attention_heads": dims.num_kv_heads,
            "num_transformer_submodules": 1,
            "num_layers": dims.num_layers,
            "encoder_hidden_size": c.encoder_hidden_size,
            "prefix_projection": c.prefix_projection,
        }),
        other => {
            return Err(Error::invalid(format!(
                "{} has no Hugging Face PEFT format; save it with --format native",
                other.method()
            )))
        }
    };
    cfg["task_type"] = task_type(arch).into();
    cfg["base_model_name_or_path"] = base_model.into();
    cfg["inference_mode"] = true.into();
    cfg["revision"] = serde_json::Value::Null;
    if let Some(o) = cfg.as_object_mut() {
        o.remove("method");
    }

    let params = match &adapter.config {
        DeltaConfig::PrefixTuning(c) => {
            let d = PrefixTuning::build(c, dims, &adapter.params)?;
            d.fold(&adapter.params)?
        }
        _ => adapter.params.clone(),
    };
    let prompt_learning = matches!(
        adapter.config,
        DeltaConfig::PromptTuning(_) | DeltaConfig::PrefixTuning(_)
    );
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (name, p) in params.iter() {
        let key = if prompt_learning {
            name.to_string()
        } else {
            format!("{PREFIX}{name}")
        };
        tensors.insert(
            key,
            p.tensor()
                .detach()
                .to_dtype(candle_core::DType::F32)?
                .contiguous()?,
        );
    }
    save_safetensors(&tensors, &dir.join(WEIGHTS))?;
    write_atomic(
        &dir.join(CONFIG),
        serde_json::to_string_pretty(&cfg)
            .unwrap_or_default()
            .as_bytes(),
    )
}

/// The delta configuration described by a PEFT `adapter_config.json` value.
pub fn config_from_json(v: &serde_json::Value, path: &Path) -> Result<DeltaConfig> {
    let peft_type = v
        .get("peft_type")
        .and_then(|t| t.as_str())
        .ok_or_else(|| Error::file(path, "missing `peft_type`"))?;
    let bad = |e: serde_json::Error| Error::file(path, format!("bad {peft_type} config: {e}"));
    if v.get("fan_in_fan_out").and_then(|f| f.as_bool()) == Some(true) {
        return Err(Error::file(
            path,
            "fan_in_fan_out = true (Conv1D weights) is not supported",
        ));
    }
    if let Some(m) = v.get("modules_to_save").filter(|m| !m.is_null()) {
        if m.as_array().is_none_or(|a| !a.is_empty()) {
            return Err(Error::file(
                path,
                format!("modules_to_save {m} is not supported"),
            ));
        }
    }
    let u = |k: &str| -> Result<usize> {
        v.get(k)
            .and_then(|x| x.as_u64())
            .map(|x| x as usize)
            .ok_or_else(|| Error::file(path, format!("missing integer `{k}`")))
    };
    // Options that change what the adapter computes and that metapeft does not implement: refuse
    // rather than load something that would compute a different function.
    for k in [
        "use_dora",
        "use_qalora",
        "lora_bias",
        "use_bdlora",
        "layer_replication",
        "target_parameters",
        "trainable_token_indices",
        "exclude_modules",
        "alora_invocation_tokens",
    ] {
        let set = match v.get(k) {
            None | Some(serde_json::Value::Null) | Some(serde_json::Value::Bool(false)) => false,
            Some(serde_json::Value::Array(a)) => !a.is_empty(),
            Some(serde_json::Value::Object(o)) => !o.is_empty(),
            Some(_) => true,
        };
        if set {
            return Err(Error::file(
                path,
                format!("`{k}` = {} is not supported by metapeft", v[k]),
            ));
        }
    }
    Ok(match peft_type {
        "LORA" => DeltaConfig::Lora(serde_json::from_value::<LoraConfig>(v.clone()).map_err(bad)?),
        "IA3" => DeltaConfig::Ia3(serde_json::from_value::<Ia3Config>(v.clone()).map_err(bad)?),
        "PROMPT_TUNING" => DeltaConfig::PromptTuning(PromptTuningConfig {
            num_virtual_tokens: u("num_virtual_tokens")?,
            prompt_tuning_init: "RANDOM".into(),
        }),
        "PREFIX_TUNING" => DeltaConfig::PrefixTuning(PrefixTuningConfig {
            num_virtual_tokens: u("num_virtual_tokens")?,
            prefix_projection: v
                .get("prefix_projection")
                .and_then(|x| x.as_bool())
                .unwrap_or(false),
            encoder_hidden_size: v
                .get("encoder_hidden_size")
                .and_then(|x| x.as_u64())
                .unwrap_or(0) as usize,
        }),
        other => {
            return Err(Error::file(
                path,
                format!(
                "peft_type `{other}` is not supported (LORA, IA3, PROMPT_TUNING, PREFIX_TUNING)"
            ),
            ))
        }
    })
}

pub fn read(dir: &Path, arch: &Arch, base: &ParamStore) -> Result<Adapter> {
    let path = dir.join(CONFIG);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Error::file(&path, format!("cannot read: {e}")))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::file(&path, format!("invalid JSON: {e}")))?;
    let config = config_from_json(&v, &path)?;
    let mut params = ParamStore::new();
    for (name, t) in load_safetensors(&dir.join(WEIGHTS))? {
        let name = name.strip_prefix(PREFIX).unwrap_or(&name);
        // Some PEFT versions keep the adapter name in the key (`lora_A.default.weight`).
        let name = name.replace(".default.", ".");
        params.insert_frozen(name, t);
    }
    config
        .build(arch, base, &params)
        .map_err(|e| Error::file(dir, e))?;
    Ok(Adapter { config, params })
}
