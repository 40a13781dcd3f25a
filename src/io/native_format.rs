//! metapeft's own adapter format, for every method (including those PEFT does not have):
//!
//! ```text
//! DIR/metapeft_adapter.json   {"format": "metapeft-adapter", "format_version": 1,
//!                              "base_model": "...", "delta": {"method": "lora", ...config}}
//! DIR/adapter.safetensors     tensors named as in the delta's parameter store,
//!                             e.g. model.layers.0.self_attn.q_proj.lora_A.weight
//! ```
//! Readers refuse a newer `format_version` instead of guessing.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;

use super::{load_safetensors, save_safetensors, write_atomic};
use crate::model::Arch;
use crate::params::ParamStore;
use crate::peft::{Adapter, DeltaConfig};
use crate::{Error, Result};

pub const CONFIG: &str = "metapeft_adapter.json";
pub const WEIGHTS: &str = "adapter.safetensors";
pub const FORMAT_VERSION: u64 = 1;

pub fn write(adapter: &Adapter, base_model: &str, dir: &Path) -> Result<()> {
    let tensors: HashMap<String, Tensor> = adapter
        .params
        .iter()
        .map(|(n, p)| {
            Ok((
                n.to_string(),
                p.tensor()
                    .detach()
                    .to_dtype(candle_core::DType::F32)?
                    .contiguous()?,
            ))
        })
        .collect::<Result<_>>()?;
    save_safetensors(&tensors, &dir.join(WEIGHTS))?;
    let cfg = serde_json::json!({
        "format": "metapeft-adapter",
        "format_version": FORMAT_VERSION,
        "base_model": base_model,
        "delta": adapter.config,
    });
    write_atomic(
        &dir.join(CONFIG),
        serde_json::to_string_pretty(&cfg)
            .unwrap_or_default()
            .as_bytes(),
    )
}

pub fn read(dir: &Path, arch: &Arch, base: &ParamStore) -> Result<Adapter> {
    let path = dir.join(CONFIG);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Error::file(&path, format!("cannot read: {e}")))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::file(&path, format!("invalid JSON: {e}")))?;
    if v.get("format").and_then(|f| f.as_str()) != Some("metapeft-adapter") {
        return Err(Error::file(
            &path,
            "not a metapeft adapter config (`format` is not \"metapeft-adapter\")",
        ));
    }
    let version = v
        .get("format_version")
        .and_then(|f| f.as_u64())
        .unwrap_or(0);
    if version != FORMAT_VERSION {
        return Err(Error::file(
            &path,
            format!("format_version {version} is not supported (this metapeft reads version {FORMAT_VERSION})"),
        ));
    }
    let config: DeltaConfig =
        serde_json::from_value(v.get("delta").cloned().unwrap_or_default())
            .map_err(|e| Error::file(&path, format!("bad `delta` section: {e}")))?;
    let mut params = ParamStore::new();
    for (name, t) in load_safetensors(&dir.join(WEIGHTS))? {
        params.insert_frozen(name, t);
    }
    config
        .build(arch, base, &params)
        .map_err(|e| Error::file(dir, e))?;
    Ok(Adapter { config, params })
}
