//! Checkpoint loading: a GGUF file, a Hugging Face directory, or a hub id.

pub mod gguf;
pub mod hub;
pub mod safetensors;

use std::path::{Path, PathBuf};

use candle_core::Device;

use super::tokenizer::TextTokenizer;
use super::Arch;
use crate::params::ParamStore;
use crate::{Error, Result};

/// A loaded model: architecture, frozen weights (Hugging Face names) and tokenizer.
#[derive(Debug)]
pub struct Checkpoint {
    pub arch: Arch,
    pub params: ParamStore,
    pub tokenizer: TextTokenizer,
    pub path: PathBuf,
    /// How the weights are stored in the file, e.g. `GGUF (Q4_1 x 210, F32 x 61, Q8_0 x 1)`.
    pub storage: String,
}

/// Where a `--model` value points.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    Gguf(PathBuf),
    HfDir(PathBuf),
    Hub(String),
}

impl ModelSource {
    pub fn resolve(spec: &str) -> Result<Self> {
        let p = Path::new(spec);
        if p.is_dir() {
            return Ok(ModelSource::HfDir(p.to_path_buf()));
        }
        if p.is_file() {
            let mut magic = [0u8; 4];
            let n = std::io::Read::read(&mut std::fs::File::open(p)?, &mut magic)?;
            if n == 4 && &magic == b"GGUF" {
                return Ok(ModelSource::Gguf(p.to_path_buf()));
            }
            return Err(Error::file(
                p,
                "not a GGUF file (no GGUF magic); pass a .gguf file or a Hugging Face model directory",
            ));
        }
        let looks_like_hub_id = spec.split('/').count() == 2
            && !spec.starts_with('.')
            && !spec.starts_with('/')
            && spec
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
        if looks_like_hub_id {
            return Ok(ModelSource::Hub(spec.to_string()));
        }
        Err(Error::file(
            p,
            "no such file or directory (and not a hub id like `org/name`)",
        ))
    }
}

/// Load a checkpoint from a GGUF file, a Hugging Face directory or a hub id.
pub fn load(spec: &str, device: &Device) -> Result<Checkpoint> {
    match ModelSource::resolve(spec)? {
        ModelSource::Gguf(p) => gguf::load(&p, device),
        ModelSource::HfDir(d) => safetensors::load_dir(&d, device),
        ModelSource::Hub(id) => {
            let dir = hub::download(&id)?;
            safetensors::load_dir(&dir, device)
        }
    }
}

/// Load a GGUF checkpoint for inference with its matrices kept quantized (see
/// [`gguf::load_quantized`]); other sources are an error.
pub fn load_quantized(spec: &str, target: Option<crate::quant::QKind>) -> Result<Checkpoint> {
    match ModelSource::resolve(spec)? {
        ModelSource::Gguf(p) => gguf::load_quantized(&p, target),
        _ => Err(Error::invalid(format!(
            "`{spec}`: quantized inference reads GGUF files only (load it in f32 instead)"
        ))),
    }
}

/// The parameter store in the architecture's canonical order (embeddings, layer 0, layer 1, ...),
/// after checking that every weight it reads is present with the right shape. A fixed order keeps
/// everything that walks the store (seeded initialisation, summaries, files) reproducible.
pub(crate) fn canonical_params(
    arch: &Arch,
    mut loaded: std::collections::HashMap<String, candle_core::Tensor>,
    path: &Path,
) -> Result<ParamStore> {
    let mut params = ParamStore::new();
    for (name, shape) in arch.expected_params() {
        let t = loaded
            .remove(&name)
            .ok_or_else(|| Error::tensor(path, &name, "missing from the checkpoint"))?;
        if t.dims() != shape.as_slice() {
            return Err(Error::tensor(
                path,
                &name,
                format!("has shape {:?}, the config implies {:?}", t.dims(), shape),
            ));
        }
        params.insert_frozen(name, t);
    }
    Ok(params)
}

/// A progress bar on stderr for loading `n` tensors, hidden when stderr is not a terminal.
pub(crate) fn progress(n: usize, what: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() || std::env::var_os("METAPEFT_NO_PROGRESS").is_some() {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(n as u64);
    pb.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} tensors {elapsed}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    pb.set_message(what.to_string());
    pb
}
