//! Checkpoint loading: a GGUF file, a Hugging Face directory, or a hub id.

pub mod gguf;
pub mod hub;
pub mod safetensors;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

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
/// Load a checkpoint keeping a GGUF's quantized matrices as blocks (see [`gguf::load_with`]).
pub fn load_quantized(spec: &str, device: &Device) -> Result<Checkpoint> {
    match ModelSource::resolve(spec)? {
        ModelSource::Gguf(p) => gguf::load_with(&p, device, true),
        _ => Err(Error::invalid(format!(
            "{spec}: only a GGUF file holds quantized weights to train on; use --base-dtype f32 \
             or bf16 for a Hugging Face model"
        ))),
    }
}

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

/// How a command stores the frozen base's matrices (`--base-dtype`, `generate --weights`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BaseStorage {
    Dense(DType),
    /// The GGUF's own quantized blocks.
    Gguf,
    /// Every matrix whose rows are whole blocks requantized to this type.
    Requantized(candle_core::quantized::GgmlDType),
    /// f32 values in the matmul kernel's own layout (panels of 16 rows): the inference layout.
    /// Same values and results as `Dense(F32)`, without transposing every weight into panels on
    /// every product; gradients still reach the input, but training steps are faster on `f32`.
    Packed,
}

impl BaseStorage {
    pub const NAMES: &'static str = "f32, bf16, f16, gguf, q8_0, q4_1, q4_0 or packed";

    pub fn parse(v: &str) -> Result<Self> {
        use candle_core::quantized::GgmlDType as G;
        Ok(match v.to_ascii_lowercase().as_str() {
            "f32" => Self::Dense(DType::F32),
            "packed" => Self::Packed,
            "bf16" => Self::Dense(DType::BF16),
            "f16" => Self::Dense(DType::F16),
            "gguf" | "quantized" => Self::Gguf,
            "q8_0" => Self::Requantized(G::Q8_0),
            "q4_1" => Self::Requantized(G::Q4_1),
            "q4_0" => Self::Requantized(G::Q4_0),
            o => {
                return Err(Error::invalid(format!(
                    "unknown weight storage `{o}`: expected {}",
                    Self::NAMES
                )))
            }
        })
    }

    /// Load `spec` (on the CPU) with its frozen matrices stored this way.
    pub fn load(self, spec: &str) -> Result<Checkpoint> {
        let dev = Device::Cpu;
        Ok(match self {
            Self::Gguf => load_quantized(spec, &dev)?,
            Self::Dense(DType::F32) => load(spec, &dev)?,
            Self::Dense(dt) => {
                let mut ck = load(spec, &dev)?;
                ck.params = ck.params.frozen_matrices_to(dt)?;
                ck
            }
            Self::Packed => {
                // From a GGUF, its blocks are dequantized straight into panels (never the whole
                // f32 base and its panels at once).
                let mut ck = match ModelSource::resolve(spec)? {
                    ModelSource::Gguf(_) => load_quantized(spec, &dev)?,
                    _ => load(spec, &dev)?,
                };
                ck.params = ck.params.into_packed()?;
                ck
            }
            Self::Requantized(q) => {
                let mut ck = load(spec, &dev)?;
                ck.params = ck.params.quantize_matrices(q)?;
                ck
            }
        })
    }
}

/// The parameter store in the architecture's canonical order (embeddings, layer 0, layer 1, ...),
/// after checking that every weight it reads is present with the right shape. A fixed order keeps
/// everything that walks the store (seeded initialisation, summaries, files) reproducible.
pub(crate) fn canonical_params(
    arch: &Arch,
    loaded: std::collections::HashMap<String, candle_core::Tensor>,
    path: &Path,
) -> Result<ParamStore> {
    canonical_params_with(arch, loaded, Default::default(), path)
}

/// [`canonical_params`] where some matrices stay quantized.
pub(crate) fn canonical_params_with(
    arch: &Arch,
    mut loaded: std::collections::HashMap<String, candle_core::Tensor>,
    mut quantized: std::collections::HashMap<String, crate::ops::QuantizedWeight>,
    path: &Path,
) -> Result<ParamStore> {
    let mut params = ParamStore::new();
    for (name, shape) in arch.expected_params() {
        if let Some(q) = quantized.remove(&name) {
            let (r, c) = q.dims();
            if shape != [r, c] {
                return Err(Error::tensor(
                    path,
                    &name,
                    format!("has shape [{r}, {c}], the config implies {shape:?}"),
                ));
            }
            params.insert_quantized(name, q);
            continue;
        }
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
