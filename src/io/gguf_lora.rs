//! LoRA adapters as GGUF for llama.cpp's `--lora`: metadata `general.type = adapter`,
//! `adapter.type = lora`, `adapter.lora.alpha`, `general.architecture` of the base; tensors
//! `blk.N.attn_q.weight.lora_a` (`[r, in]` as PEFT, i.e. ggml `ne = [in, r]`) and `.lora_b`
//! (`[out, r]`).
//!
//! llama.cpp scales every module by `alpha / r`. Per-module ranks and alphas and rsLoRA's
//! `alpha / sqrt(r)` are folded into `B` so the applied scale stays right, and `B`'s rows for Q
//! and K are permuted into llama.cpp's RoPE layout as its own converter does.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use crate::model::load::gguf::{gguf_name, hf_name, permute_rows, unpermute_rows};
use crate::model::{Arch, LlamaConfig};
use crate::params::ParamStore;
use crate::peft::lora::LoraConfig;
use crate::peft::targets::TargetModules;
use crate::peft::{Adapter, DeltaConfig};
use crate::{Error, Result};

fn llama_cfg(arch: &Arch) -> Result<&LlamaConfig> {
    match arch {
        Arch::Llama(c) => Ok(c),
        Arch::Bert(_) => Err(Error::invalid(
            "GGUF LoRA export is for llama.cpp decoders, not encoders",
        )),
    }
}

fn gguf_arch(c: &LlamaConfig) -> &str {
    match c.model_type.as_str() {
        "qwen2" => "qwen2",
        _ => "llama",
    }
}

pub fn write(adapter: &Adapter, arch: &Arch, base: &ParamStore, path: &Path) -> Result<()> {
    let c = llama_cfg(arch)?;
    let DeltaConfig::Lora(cfg) = &adapter.config else {
        return Err(Error::invalid(format!(
            "GGUF LoRA export needs a LoRA adapter, not {}",
            adapter.config.method()
        )));
    };
    if cfg.bias != "none" {
        return Err(Error::invalid(
            "GGUF LoRA cannot carry trained biases (bias != none)",
        ));
    }
    let permuted = c.model_type != "qwen2";
    let alpha = cfg.lora_alpha;
    let mut tensors: Vec<(String, QTensor)> = vec![];
    for (m, _, _, r, scale) in cfg.modules(base)? {
        let a = adapter.params.get(&format!("{m}.lora_A.weight"))?.detach();
        let b = adapter.params.get(&format!("{m}.lora_B.weight"))?.detach();
        let fold = scale * r as f64 / alpha;
        let mut b = (b * fold)?;
        if permuted && m.ends_with("q_proj") {
            b = permute_rows(&b, c.num_attention_heads)?;
        } else if permuted && m.ends_with("k_proj") {
            b = permute_rows(&b, c.num_key_value_heads)?;
        }
        let g = gguf_name(&format!("{m}.weight"))
            .ok_or_else(|| Error::invalid(format!("module `{m}` has no GGUF name")))?;
        tensors.push((
            format!("{g}.lora_a"),
            QTensor::quantize(&a.contiguous()?, GgmlDType::F32)?,
        ));
        tensors.push((
            format!("{g}.lora_b"),
            QTensor::quantize(&b.contiguous()?, GgmlDType::F32)?,
        ));
    }
    let meta: Vec<(&str, Value)> = vec![
        ("general.type", Value::String("adapter".into())),
        ("general.architecture", Value::String(gguf_arch(c).into())),
        ("general.name", Value::String("metapeft LoRA".into())),
        ("adapter.type", Value::String("lora".into())),
        ("adapter.lora.alpha", Value::F32(alpha as f32)),
    ];
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".lora.gguf.tmp-{}", std::process::id()));
    {
        let mut f = std::fs::File::create(&tmp)?;
        gguf_file::write(&mut f, &meta_refs, &tensor_refs).map_err(|e| Error::file(&tmp, e))?;
    }
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Read a GGUF LoRA back as a LoRA adapter in Hugging Face layout (`B` un-permuted; the folded
/// scale appears as `alpha / r` per module).
pub fn read(path: &Path, arch: &Arch, base: &ParamStore) -> Result<Adapter> {
    let c = llama_cfg(arch)?;
    let (ct, mut f) = crate::model::load::gguf::read_content(path)?;
    let meta_str = |k: &str| ct.metadata.get(k).and_then(|v| v.to_string().ok()).cloned();
    if meta_str("general.type").as_deref() != Some("adapter")
        || meta_str("adapter.type").as_deref() != Some("lora")
    {
        return Err(Error::file(
            path,
            "not a GGUF LoRA adapter (general.type/adapter.type)",
        ));
    }
    let arch_name = meta_str("general.architecture").unwrap_or_default();
    if arch_name != gguf_arch(c) {
        return Err(Error::file(
            path,
            format!(
                "adapter is for `{arch_name}`, the base model is `{}`",
                gguf_arch(c)
            ),
        ));
    }
    let alpha = ct
        .metadata
        .get("adapter.lora.alpha")
        .and_then(|v| v.to_f32().ok())
        .ok_or_else(|| Error::file(path, "missing adapter.lora.alpha"))? as f64;
    let permuted = c.model_type != "qwen2";
    let mut params = ParamStore::new();
    let mut ranks: BTreeMap<String, usize> = BTreeMap::new();
    let mut modules = vec![];
    let names: Vec<String> = ct.tensor_infos.keys().cloned().collect();
    let mut loaded: HashMap<String, Tensor> = HashMap::new();
    for n in &names {
        let t = ct
            .tensor(&mut f, n, &Device::Cpu)
            .and_then(|q| q.dequantize(&Device::Cpu))
            .map_err(|e| Error::tensor(path, n, e))?;
        loaded.insert(n.clone(), t);
    }
    for n in &names {
        let Some(w) = n.strip_suffix(".lora_a") else {
            continue;
        };
        let hf =
            hf_name(w).ok_or_else(|| Error::tensor(path, n, "not a known llama.cpp tensor"))?;
        let m = hf.strip_suffix(".weight").unwrap_or(&hf).to_string();
        let a = loaded[n].clone();
        let mut b = loaded
            .get(&format!("{w}.lora_b"))
            .ok_or_else(|| Error::tensor(path, n, "has no matching lora_b"))?
            .clone();
        if permuted && m.ends_with("q_proj") {
            b = unpermute_rows(&b, c.num_attention_heads)?;
        } else if permuted && m.ends_with("k_proj") {
            b = unpermute_rows(&b, c.num_key_value_heads)?;
        }
        ranks.insert(m.clone(), a.dim(0)?);
        params.insert_frozen(format!("{m}.lora_A.weight"), a);
        params.insert_frozen(format!("{m}.lora_B.weight"), b);
        modules.push(m);
    }
    let r = *ranks
        .values()
        .next()
        .ok_or_else(|| Error::file(path, "no LoRA tensors"))?;
    let mut cfg = LoraConfig::new(r, alpha, &[]);
    cfg.target_modules = TargetModules::List(modules);
    // Exact module names as keys: `(.*\.)?key$` matches only that module.
    cfg.rank_pattern = ranks.into_iter().filter(|(_, rr)| *rr != r).collect();
    let config = DeltaConfig::Lora(cfg);
    config
        .build(arch, base, &params)
        .map_err(|e| Error::file(path, e))?;
    Ok(Adapter { config, params })
}
