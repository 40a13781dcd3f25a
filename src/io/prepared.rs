//! The prepared-model directory written by `metapeft prepare`:
//! `prepared.json` (what was prepared, how, from which base), `adapter/` (the meta-learned delta
//! initialisation, metapeft format), `model/` (a Hugging Face directory, only when the outer loop
//! trained the base) and optional extras (`meta_sgd_lrs.safetensors`, TAMS architectures).
//! `adapt --from`, `eval`, `generate` and `export` accept such a directory.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

pub const INFO: &str = "prepared.json";
pub const FORMAT_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PreparedInfo {
    pub format_version: u32,
    pub algo: String,
    pub family: String,
    /// The model preparation started from (a path or hub id).
    pub base_model: String,
    /// Whether `model/` holds an updated base (priming, `--train-base`).
    pub base_trained: bool,
    pub method: String,
    /// The resolved meta-training configuration.
    pub config: serde_json::Value,
    /// Meta-training summary (steps, validation losses, seconds per episode).
    pub report: serde_json::Value,
    /// TAMS: the discrete architecture chosen per meta-train task, when TAMS was on.
    #[serde(default)]
    pub architectures: Option<serde_json::Value>,
}

pub fn is_prepared(dir: &Path) -> bool {
    dir.join(INFO).is_file()
}

pub fn read_info(dir: &Path) -> Result<PreparedInfo> {
    let path = dir.join(INFO);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        Error::file(
            &path,
            format!("cannot read ({e}); is this a `metapeft prepare` output?"),
        )
    })?;
    let info: PreparedInfo = serde_json::from_str(&text).map_err(|e| {
        Error::file(
            &path,
            format!("not a valid prepared-model description: {e}"),
        )
    })?;
    if info.format_version != FORMAT_VERSION {
        return Err(Error::file(
            &path,
            format!(
                "format_version {} is not supported (this metapeft reads {FORMAT_VERSION})",
                info.format_version
            ),
        ));
    }
    Ok(info)
}

pub fn write_info(dir: &Path, info: &PreparedInfo) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let text = serde_json::to_string_pretty(info)
        .map_err(|e| Error::invalid(format!("cannot serialise {INFO}: {e}")))?;
    super::write_atomic(&dir.join(INFO), text.as_bytes())
}

/// The delta initialisation of a prepared directory.
pub fn adapter_dir(dir: &Path) -> PathBuf {
    dir.join("adapter")
}

/// The meta-learned per-token head of a token-classification family (`head.safetensors`,
/// `labels.json`, `head.json`), when there is one.
pub fn head_dir(dir: &Path) -> PathBuf {
    dir.join("head")
}

/// The model a prepared directory stands for: its `model/` when the base was trained, else the
/// base model it was prepared from.
pub fn model_spec(dir: &Path) -> Result<String> {
    let info = read_info(dir)?;
    if info.base_trained {
        let m = dir.join("model");
        if !m.join("config.json").is_file() {
            return Err(Error::file(
                &m,
                "the prepared base model is missing (an interrupted `prepare`?)",
            ));
        }
        Ok(m.to_string_lossy().into_owned())
    } else {
        Ok(info.base_model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> PreparedInfo {
        PreparedInfo {
            format_version: FORMAT_VERSION,
            algo: "fomaml".into(),
            family: "lm-domains".into(),
            base_model: "/models/base.gguf".into(),
            base_trained: false,
            method: "lora".into(),
            config: serde_json::json!({"inner_steps": 5}),
            report: serde_json::json!({}),
            architectures: None,
        }
    }

    #[test]
    fn round_trip_and_bad_input() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("mp-prepared-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        write_info(&dir, &info())?;
        assert!(is_prepared(&dir));
        assert_eq!(read_info(&dir)?, info());
        assert_eq!(model_spec(&dir)?, "/models/base.gguf");
        // Trained base without its model directory.
        write_info(
            &dir,
            &PreparedInfo {
                base_trained: true,
                ..info()
            },
        )?;
        assert!(model_spec(&dir)
            .unwrap_err()
            .to_string()
            .contains("missing"));
        // Truncated file.
        let text = std::fs::read_to_string(dir.join(INFO))?;
        std::fs::write(dir.join(INFO), &text[..text.len() / 2])?;
        assert!(read_info(&dir)
            .unwrap_err()
            .to_string()
            .contains("not a valid prepared-model"));
        // Unknown version.
        write_info(
            &dir,
            &PreparedInfo {
                format_version: 99,
                ..info()
            },
        )?;
        assert!(read_info(&dir)
            .unwrap_err()
            .to_string()
            .contains("format_version 99"));
        std::fs::remove_dir_all(&dir)?;
        assert!(read_info(&dir).unwrap_err().to_string().contains("prepare"));
        Ok(())
    }
}
