//! Hugging Face model directories: `config.json` + one or more `*.safetensors` (f32/f16/bf16,
//! memory-mapped) + `tokenizer.json`.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use candle_core::safetensors::{Load, MmapedSafetensors};
use candle_core::{DType, Device};

use super::{canonical_params, progress, Checkpoint};
use crate::model::config::{BertConfig, LlamaConfig};
use crate::model::tokenizer::TextTokenizer;
use crate::model::Arch;
use crate::{Error, Result};

pub fn read_config(dir: &Path) -> Result<Arch> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Error::file(&path, format!("cannot read: {e}")))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::file(&path, format!("invalid JSON: {e}")))?;
    let model_type = v.get("model_type").and_then(|x| x.as_str()).unwrap_or("");
    if model_type == "bert" {
        Ok(Arch::Bert(
            BertConfig::from_hf_json(&v).map_err(|m| Error::config(&path, m))?,
        ))
    } else {
        Ok(Arch::Llama(
            LlamaConfig::from_hf_json(&v).map_err(|m| Error::config(&path, m))?,
        ))
    }
}

/// Checkpoint names -> the names the architectures read (`bert.` prefix, old `gamma`/`beta`).
fn normalize_name(arch: &Arch, name: &str) -> String {
    match arch {
        Arch::Bert(_) => {
            let n = name.strip_prefix("bert.").unwrap_or(name);
            n.replace("LayerNorm.gamma", "LayerNorm.weight")
                .replace("LayerNorm.beta", "LayerNorm.bias")
        }
        Arch::Llama(_) => name.to_string(),
    }
}

pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::file(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::file(
            dir,
            "no *.safetensors weights in this directory",
        ));
    }
    Ok(files)
}

pub fn load_dir(dir: &Path, device: &Device) -> Result<Checkpoint> {
    let arch = read_config(dir)?;
    let wanted: HashSet<String> = arch.expected_params().into_iter().map(|(n, _)| n).collect();
    let mut loaded = std::collections::HashMap::new();
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for file in safetensors_files(dir)? {
        // SAFETY: the file is mapped read-only; metapeft never writes to a file it has mapped.
        let st = unsafe { MmapedSafetensors::new(&file) }
            .map_err(|e| Error::file(&file, format!("not a valid safetensors file: {e}")))?;
        let tensors = st.tensors();
        let pb = progress(tensors.len(), "loading safetensors");
        for (name, view) in tensors {
            pb.inc(1);
            let norm = normalize_name(&arch, &name);
            if !wanted.contains(&norm) {
                continue;
            }
            let dt = view.dtype();
            use safetensors::Dtype as S;
            if !matches!(dt, S::F32 | S::F16 | S::BF16 | S::F64) {
                return Err(Error::tensor(
                    &file,
                    &name,
                    format!("has dtype {dt:?}; expected a float tensor (f32, f16 or bf16)"),
                ));
            }
            *kinds.entry(format!("{dt:?}")).or_default() += 1;
            let t = view
                .load(device)
                .map_err(|e| Error::tensor(&file, &name, e))?
                .to_dtype(DType::F32)?;
            loaded.insert(norm, t);
        }
        pb.finish_and_clear();
    }
    let params = canonical_params(&arch, loaded, dir)?;
    let tokenizer = match &arch {
        Arch::Llama(c) => TextTokenizer::from_hf_dir(dir, &c.eos_token_ids, c.bos_token_id)?,
        Arch::Bert(_) => TextTokenizer::from_hf_dir(dir, &[], None)?,
    };
    let storage = kinds
        .iter()
        .map(|(k, n)| format!("{k} x {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    Ok(Checkpoint {
        arch,
        params,
        tokenizer,
        path: dir.to_path_buf(),
        storage: format!("safetensors ({storage})"),
    })
}
