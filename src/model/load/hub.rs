//! Downloading a model from the Hugging Face hub (`--model org/name`) into the hub's cache.

use std::path::PathBuf;

use crate::{Error, Result};

fn hub_error(id: &str, e: impl std::fmt::Display) -> Error {
    Error::invalid(format!(
        "could not fetch `{id}` from the Hugging Face hub: {e}. If this machine is offline, download \
         the model elsewhere and pass its directory (config.json, *.safetensors, tokenizer.json) or a \
         .gguf file to --model"
    ))
}

/// Fetch config, tokenizer and weights of `id`; returns the local snapshot directory.
pub fn download(id: &str) -> Result<PathBuf> {
    let api = hf_hub::api::sync::ApiBuilder::new()
        .with_progress(true)
        .build()
        .map_err(|e| hub_error(id, e))?;
    let repo = api.model(id.to_string());
    let config = repo.get("config.json").map_err(|e| hub_error(id, e))?;
    repo.get("tokenizer.json").map_err(|e| hub_error(id, e))?;
    // Optional files: their absence is not an error.
    let _ = repo.get("tokenizer_config.json");
    match repo.get("model.safetensors") {
        Ok(_) => {}
        Err(_) => {
            let index = repo
                .get("model.safetensors.index.json")
                .map_err(|e| hub_error(id, e))?;
            let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index)?)
                .map_err(|e| Error::file(&index, e))?;
            let mut shards: Vec<String> = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .map(|m| {
                    m.values()
                        .filter_map(|s| s.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            shards.sort();
            shards.dedup();
            for s in shards {
                repo.get(&s).map_err(|e| hub_error(id, e))?;
            }
        }
    }
    config
        .parent()
        .map(|p| p.to_path_buf())
        .ok_or_else(|| hub_error(id, "bad cache path"))
}
