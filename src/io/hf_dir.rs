//! A Hugging Face model directory (config.json, model.safetensors, tokenizer files) written from a
//! loaded checkpoint, so that `transformers` and metapeft both load it. Weights are written in
//! f32 with Hugging Face names (GGUF Q/K rows already un-permuted at load).

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;

use super::write_atomic;
use crate::model::{Arch, Checkpoint, TextTokenizer};
use crate::params::ParamStore;
use crate::{Error, Result};

pub fn write_hf_dir(ckpt: &Checkpoint, dir: &Path) -> Result<()> {
    write_parts(&ckpt.arch, &ckpt.params, &ckpt.tokenizer, dir)
}

/// Write a Hugging Face directory from an architecture, its weights and its tokenizer.
pub fn write_parts(
    arch: &Arch,
    params: &ParamStore,
    tok: &TextTokenizer,
    dir: &Path,
) -> Result<()> {
    let cfg = match arch {
        Arch::Llama(c) => c,
        Arch::Bert(c) => return write_bert(c, params, tok, dir),
    };
    std::fs::create_dir_all(dir)?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (name, p) in params.iter() {
        tensors.insert(
            name.to_string(),
            p.tensor().to_dtype(candle_core::DType::F32)?.contiguous()?,
        );
    }
    let st = dir.join("model.safetensors");
    let tmp = dir.join(".model.safetensors.tmp");
    candle_core::safetensors::save(&tensors, &tmp).map_err(|e| Error::file(&tmp, e))?;
    std::fs::rename(&tmp, &st)?;

    write_atomic(
        &dir.join("config.json"),
        serde_json::to_string_pretty(&cfg.to_hf_json())
            .unwrap_or_default()
            .as_bytes(),
    )?;

    let tj = tok
        .inner()
        .to_string(true)
        .map_err(|e| Error::invalid(format!("cannot serialise the tokenizer: {e}")))?;
    write_atomic(&dir.join("tokenizer.json"), tj.as_bytes())?;
    let name = |id: Option<u32>| id.and_then(|i| tok.inner().id_to_token(i));
    let mut tc = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": tok.add_bos,
        "add_eos_token": false,
        "clean_up_tokenization_spaces": false,
        "model_max_length": cfg.max_position_embeddings,
    });
    if let Some(b) = name(tok.bos_id) {
        tc["bos_token"] = b.into();
    }
    if let Some(e) = name(tok.eos_ids.first().copied()) {
        tc["eos_token"] = e.into();
    }
    if let Some(p) = name(tok.pad_id) {
        tc["pad_token"] = p.into();
    }
    if let Some(t) = &tok.chat_template {
        tc["chat_template"] = t.clone().into();
    }
    write_atomic(
        &dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&tc)
            .unwrap_or_default()
            .as_bytes(),
    )?;
    let mut gen = serde_json::json!({});
    if let Some(b) = cfg.bos_token_id {
        gen["bos_token_id"] = b.into();
    }
    if !cfg.eos_token_ids.is_empty() {
        gen["eos_token_id"] = cfg.eos_token_ids.clone().into();
    }
    write_atomic(
        &dir.join("generation_config.json"),
        gen.to_string().as_bytes(),
    )?;
    Ok(())
}

fn write_bert(
    cfg: &crate::model::BertConfig,
    params: &ParamStore,
    tok: &TextTokenizer,
    dir: &Path,
) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let tensors: HashMap<String, Tensor> = params
        .iter()
        .map(|(n, p)| {
            Ok((
                n.to_string(),
                p.tensor().to_dtype(candle_core::DType::F32)?.contiguous()?,
            ))
        })
        .collect::<Result<_>>()?;
    super::save_safetensors(&tensors, &dir.join("model.safetensors"))?;
    let mut v = serde_json::to_value(cfg).unwrap_or_default();
    v["model_type"] = "bert".into();
    v["architectures"] = serde_json::json!(["BertModel"]);
    v["position_embedding_type"] = "absolute".into();
    write_atomic(
        &dir.join("config.json"),
        serde_json::to_string_pretty(&v)
            .unwrap_or_default()
            .as_bytes(),
    )?;
    let tj = tok
        .inner()
        .to_string(true)
        .map_err(|e| Error::invalid(format!("cannot serialise the tokenizer: {e}")))?;
    write_atomic(&dir.join("tokenizer.json"), tj.as_bytes())
}
