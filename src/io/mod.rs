//! Writing and reading what metapeft makes, in formats the rest of the ecosystem loads. Every
//! writer writes to a temporary file and renames it into place, so a crash never leaves a
//! half-written file; every reader checks the whole file before returning anything.

pub mod gguf_lora;
pub mod hf_dir;
pub mod merged;
pub mod native_format;
pub mod peft_format;
pub mod prepared;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};

use crate::model::Arch;
use crate::params::ParamStore;
use crate::peft::Adapter;
use crate::{Error, Result};

/// Write `bytes` to `path` atomically (temporary file in the same directory, then rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("out"),
        std::process::id()
    ));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Save tensors as safetensors atomically.
pub fn save_safetensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("out"),
        std::process::id()
    ));
    candle_core::safetensors::save(tensors, &tmp).map_err(|e| Error::file(&tmp, e))?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Read every tensor of a safetensors file (as f32), with clear errors for bad files.
pub fn load_safetensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let data = std::fs::read(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
    let st = safetensors::SafeTensors::deserialize(&data)
        .map_err(|e| Error::file(path, format!("not a valid safetensors file: {e}")))?;
    let mut out = vec![];
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    for name in names {
        let view = st
            .tensor(&name)
            .map_err(|e| Error::tensor(path, &name, e))?;
        use candle_core::safetensors::Load;
        let t = view
            .load(&candle_core::Device::Cpu)
            .map_err(|e| Error::tensor(path, &name, e))?;
        if !t.dtype().is_float() {
            return Err(Error::tensor(
                path,
                &name,
                format!("has dtype {:?}; expected a float tensor", t.dtype()),
            ));
        }
        out.push((name, t.to_dtype(DType::F32)?));
    }
    Ok(out)
}

/// The formats an adapter can be saved in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AdapterFormat {
    /// Hugging Face PEFT (`adapter_config.json` + `adapter_model.safetensors`)
    Peft,
    /// metapeft's own format, for every method (`metapeft_adapter.json` + `adapter.safetensors`)
    Native,
}

/// Load an adapter directory in either format, checked against the base model. Nothing is
/// returned unless every tensor fits.
pub fn load_adapter(dir: &Path, arch: &Arch, base: &ParamStore) -> Result<Adapter> {
    if dir.join(peft_format::CONFIG).is_file() {
        peft_format::read(dir, arch, base)
    } else if dir.join(native_format::CONFIG).is_file() {
        native_format::read(dir, arch, base)
    } else if dir.is_dir() {
        Err(Error::file(
            dir,
            format!(
                "not an adapter directory: no {} (PEFT) or {} (metapeft)",
                peft_format::CONFIG,
                native_format::CONFIG
            ),
        ))
    } else {
        Err(Error::file(dir, "no such adapter directory"))
    }
}

/// Save an adapter in `format`.
pub fn save_adapter(
    adapter: &Adapter,
    arch: &Arch,
    base_model: &str,
    dir: &Path,
    format: AdapterFormat,
) -> Result<()> {
    match format {
        AdapterFormat::Peft => peft_format::write(adapter, arch, base_model, dir),
        AdapterFormat::Native => native_format::write(adapter, base_model, dir),
    }
}
