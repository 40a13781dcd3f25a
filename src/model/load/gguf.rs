//! GGUF checkpoints (llama.cpp): metadata -> config, tensors dequantized to f32 and renamed to
//! Hugging Face names, Q/K rows un-permuted back to the rotate-half RoPE layout.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Content};
use candle_core::{Device, Tensor};

use super::{canonical_params, progress, Checkpoint};
use crate::model::config::LlamaConfig;
use crate::model::tokenizer::TextTokenizer;
use crate::model::Arch;
use crate::ops::rope::RopeScaling;
use crate::quant::{QKind, QWeight};
use crate::{Error, Result};

pub const ARCHITECTURES: [&str; 3] = ["llama", "mistral", "qwen2"];

/// Read the header and metadata of a GGUF file, with clear errors for non-GGUF and truncated files.
pub fn read_content(path: &Path) -> Result<(Content, File)> {
    let mut f = File::open(path).map_err(|e| Error::file(path, e))?;
    let file_len = f.metadata().map_err(|e| Error::file(path, e))?.len();
    let ct = Content::read(&mut f)
        .map_err(|e| Error::file(path, format!("not a valid GGUF file: {e}")))?;
    for (name, info) in &ct.tensor_infos {
        let dt = info.ggml_dtype;
        let bytes = (info.shape.elem_count() / dt.block_size() * dt.type_size()) as u64;
        let end = ct.tensor_data_offset + info.offset + bytes;
        if end > file_len {
            return Err(Error::tensor(
                path,
                name,
                format!("file is truncated: the tensor's data ends at byte {end} but the file has {file_len} bytes"),
            ));
        }
    }
    Ok((ct, f))
}

fn meta<'a>(ct: &'a Content, key: &str) -> Option<&'a gguf_file::Value> {
    ct.metadata.get(key)
}

pub fn config_from_gguf(ct: &Content, path: &Path) -> Result<LlamaConfig> {
    let arch = meta(ct, "general.architecture")
        .and_then(|v| v.to_string().ok())
        .ok_or_else(|| Error::config(path, "missing `general.architecture`"))?
        .clone();
    if !ARCHITECTURES.contains(&arch.as_str()) {
        return Err(Error::config(
            path,
            format!(
                "unknown architecture `{arch}` (supported: {})",
                ARCHITECTURES.join(", ")
            ),
        ));
    }
    let u = |k: &str| -> Result<usize> {
        meta(ct, &format!("{arch}.{k}"))
            .and_then(|v| v.to_u64().ok().or_else(|| v.to_u32().ok().map(u64::from)))
            .map(|v| v as usize)
            .ok_or_else(|| Error::config(path, format!("missing `{arch}.{k}`")))
    };
    let f = |k: &str| {
        meta(ct, &format!("{arch}.{k}"))
            .and_then(|v| v.to_f32().ok())
            .map(f64::from)
    };
    let hidden = u("embedding_length")?;
    let heads = u("attention.head_count")?;
    let kv = u("attention.head_count_kv").unwrap_or(heads);
    let head_dim = u("attention.key_length").unwrap_or(hidden / heads.max(1));
    let vocab = match u("vocab_size") {
        Ok(v) => v,
        Err(_) => meta(ct, "tokenizer.ggml.tokens")
            .and_then(|v| v.to_vec().ok())
            .map(|v| v.len())
            .ok_or_else(|| Error::config(path, "cannot tell the vocabulary size"))?,
    };
    if ct.tensor_infos.contains_key("rope_freqs.weight") {
        return Err(Error::config(
            path,
            "per-frequency RoPE factors (`rope_freqs.weight`, Llama 3.1 style) are not supported yet; use the Hugging Face checkpoint",
        ));
    }
    let rope_scaling =
        match meta(ct, &format!("{arch}.rope.scaling.type")).and_then(|v| v.to_string().ok()) {
            Some(t) if t == "linear" => Some(RopeScaling::Linear {
                factor: f("rope.scaling.factor").unwrap_or(1.0),
            }),
            Some(t) if t == "none" => None,
            Some(t) => {
                return Err(Error::config(
                    path,
                    format!("RoPE scaling `{t}` is not supported"),
                ))
            }
            None => None,
        };
    let id = |k: &str| meta(ct, k).and_then(|v| v.to_u32().ok());
    let cfg = LlamaConfig {
        model_type: arch.clone(),
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: u("feed_forward_length")?,
        num_hidden_layers: u("block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: kv,
        head_dim,
        rms_norm_eps: f("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
        rope_theta: f("rope.freq_base").unwrap_or(10000.0),
        rope_scaling,
        max_position_embeddings: u("context_length").unwrap_or(4096),
        tie_word_embeddings: !ct.tensor_infos.contains_key("output.weight"),
        attention_bias: ct.tensor_infos.contains_key("blk.0.attn_q.bias"),
        mlp_bias: ct.tensor_infos.contains_key("blk.0.ffn_up.bias"),
        bos_token_id: id("tokenizer.ggml.bos_token_id"),
        eos_token_ids: id("tokenizer.ggml.eos_token_id").into_iter().collect(),
    };
    cfg.validate().map_err(|m| Error::config(path, m))?;
    Ok(cfg)
}

/// The Hugging Face name of a GGUF tensor, or None for tensors the model does not read.
pub fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = tail.rsplit_once('.')?;
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// The GGUF name of a Hugging Face tensor name (the inverse of [`hf_name`]).
pub fn gguf_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, tail) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = tail.rsplit_once('.')?;
    let g = match module {
        "input_layernorm" => "attn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "post_attention_layernorm" => "ffn_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{kind}"))
}

/// Undo llama.cpp's Q/K row permutation (interleaved RoPE pairs -> rotate-half halves).
pub fn unpermute_rows(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let dims = w.dims().to_vec();
    let out = dims[0];
    let rest: usize = dims[1..].iter().product();
    let hd = out / n_head;
    Ok(w.reshape((n_head, hd / 2, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

/// The inverse of [`unpermute_rows`]: Hugging Face layout -> GGUF layout.
pub fn permute_rows(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let dims = w.dims().to_vec();
    let out = dims[0];
    let rest: usize = dims[1..].iter().product();
    let hd = out / n_head;
    Ok(w.reshape((n_head, 2, hd / 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

pub fn load(path: &Path, device: &Device) -> Result<Checkpoint> {
    let (ct, mut file) = read_content(path)?;
    let cfg = config_from_gguf(&ct, path)?;
    let permuted = cfg.model_type != "qwen2";
    let mut loaded = std::collections::HashMap::new();
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    let names: Vec<String> = ct.tensor_infos.keys().cloned().collect();
    let pb = progress(names.len(), "loading GGUF");
    for name in &names {
        pb.inc(1);
        let Some(hf) = hf_name(name) else { continue };
        *kinds
            .entry(format!("{:?}", ct.tensor_infos[name].ggml_dtype))
            .or_default() += 1;
        let q = ct
            .tensor(&mut file, name, device)
            .map_err(|e| Error::tensor(path, name, format!("cannot read: {e}")))?;
        let mut t = q
            .dequantize(device)
            .map_err(|e| Error::tensor(path, name, format!("cannot dequantize: {e}")))?;
        if permuted {
            if hf.contains("q_proj") {
                t = unpermute_rows(&t, cfg.num_attention_heads)?;
            } else if hf.contains("k_proj") {
                t = unpermute_rows(&t, cfg.num_key_value_heads)?;
            }
        }
        loaded.insert(hf, t);
    }
    pb.finish_and_clear();
    let arch = Arch::Llama(cfg);
    let params = canonical_params(&arch, loaded, path)?;
    let tokenizer = TextTokenizer::from_gguf(&ct, path)?;
    let storage = kinds
        .iter()
        .map(|(k, n)| format!("{k} x {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    Ok(Checkpoint {
        arch,
        params,
        tokenizer,
        path: path.to_path_buf(),
        storage: format!("GGUF ({storage})"),
    })
}

/// Row order that undoes llama.cpp's Q/K permutation on whole rows: row `r` of the result is row
/// `src[r]` of the GGUF tensor (the same map as [`unpermute_rows`]).
pub fn unpermute_index(rows: usize, n_head: usize) -> Vec<usize> {
    let hd = rows / n_head;
    (0..rows)
        .map(|r| {
            let (h, rem) = (r / hd, r % hd);
            let (a, b) = (rem / (hd / 2), rem % (hd / 2));
            h * hd + 2 * b + a
        })
        .collect()
}

/// Whether a Hugging Face weight name is a matrix that quantized inference keeps quantized.
fn quantizable(hf: &str) -> bool {
    hf.ends_with("_proj.weight") || hf == "model.embed_tokens.weight" || hf == "lm_head.weight"
}

/// Load a GGUF for inference with its matrices kept quantized: `target: None` keeps the file's
/// block format (Q8_0 or Q4_1; others are an error), `Some(kind)` converts every matrix to `kind`
/// (blocks of that kind are kept as they are, others are dequantized and requantized; Q8_0
/// matrices are kept under a Q4_1 target). Norms stay
/// f32. The store cannot be trained (PEFT needs f32 weights).
pub fn load_quantized(path: &Path, target: Option<QKind>) -> Result<Checkpoint> {
    let device = &Device::Cpu;
    let (ct, mut file) = read_content(path)?;
    let cfg = config_from_gguf(&ct, path)?;
    let permuted = cfg.model_type != "qwen2";
    let mut dense = std::collections::HashMap::new();
    let mut quant = std::collections::HashMap::new();
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    let names: Vec<String> = ct.tensor_infos.keys().cloned().collect();
    let pb = progress(names.len(), "loading GGUF (quantized)");
    for name in &names {
        pb.inc(1);
        let Some(hf) = hf_name(name) else { continue };
        let heads = if !permuted {
            None
        } else if hf.contains("q_proj.weight") {
            Some(cfg.num_attention_heads)
        } else if hf.contains("k_proj.weight") {
            Some(cfg.num_key_value_heads)
        } else {
            None
        };
        let q = ct
            .tensor(&mut file, name, device)
            .map_err(|e| Error::tensor(path, name, format!("cannot read: {e}")))?;
        if quantizable(&hf) {
            let file_kind = QKind::from_ggml(q.dtype());
            let w = match (target, file_kind) {
                (None, Err(e)) => return Err(Error::tensor(path, name, e.to_string())),
                (None, Ok(_)) => QWeight::from_qtensor(&q)?,
                (Some(t), Ok(k)) if t == k => QWeight::from_qtensor(&q)?,
                // Q8_0 matrices in a Q4_1 model (llama.cpp keeps the token embedding in Q8_0)
                // stay as they are: requantizing them to 4 bits would only lose precision.
                (Some(QKind::Q4_1), Ok(QKind::Q8_0)) => QWeight::from_qtensor(&q)?,
                (Some(t), _) => {
                    let mut f = q.dequantize(device).map_err(|e| {
                        Error::tensor(path, name, format!("cannot dequantize: {e}"))
                    })?;
                    if let Some(h) = heads {
                        f = unpermute_rows(&f, h)?;
                    }
                    let w = QWeight::quantize(&f, t)?;
                    *kinds.entry(format!("{:?}", w.kind)).or_default() += 1;
                    quant.insert(hf, w);
                    continue;
                }
            };
            let w = match heads {
                Some(h) => w.gather_rows(&unpermute_index(w.n, h)),
                None => w,
            };
            *kinds.entry(format!("{:?}", w.kind)).or_default() += 1;
            quant.insert(hf, w);
        } else {
            *kinds.entry(format!("{:?}", q.dtype())).or_default() += 1;
            let t = q
                .dequantize(device)
                .map_err(|e| Error::tensor(path, name, format!("cannot dequantize: {e}")))?;
            dense.insert(hf, t);
        }
    }
    pb.finish_and_clear();
    let arch = Arch::Llama(cfg);
    let mut params = crate::params::ParamStore::new();
    for (name, shape) in arch.expected_params() {
        if let Some(w) = quant.remove(&name) {
            if [w.n, w.k] != shape.as_slice() {
                return Err(Error::tensor(
                    path,
                    &name,
                    format!("has shape [{}, {}], the config implies {shape:?}", w.n, w.k),
                ));
            }
            params.insert_quantized(name, w);
        } else {
            let t = dense
                .remove(&name)
                .ok_or_else(|| Error::tensor(path, &name, "missing from the checkpoint"))?;
            if t.dims() != shape.as_slice() {
                return Err(Error::tensor(
                    path,
                    &name,
                    format!("has shape {:?}, the config implies {shape:?}", t.dims()),
                ));
            }
            params.insert_frozen(name, t);
        }
    }
    let tokenizer = TextTokenizer::from_gguf(&ct, path)?;
    let storage = kinds
        .iter()
        .map(|(k, n)| format!("{k} x {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    Ok(Checkpoint {
        arch,
        params,
        tokenizer,
        path: path.to_path_buf(),
        storage: format!("GGUF, kept quantized ({storage})"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_hugging_face() {
        assert_eq!(
            hf_name("blk.12.attn_q.weight").unwrap(),
            "model.layers.12.self_attn.q_proj.weight"
        );
        assert_eq!(
            hf_name("blk.0.ffn_down.weight").unwrap(),
            "model.layers.0.mlp.down_proj.weight"
        );
        assert_eq!(
            hf_name("token_embd.weight").unwrap(),
            "model.embed_tokens.weight"
        );
        assert_eq!(hf_name("rope_freqs.weight"), None);
        for n in [
            "model.layers.3.mlp.up_proj.weight",
            "model.layers.0.self_attn.k_proj.bias",
            "lm_head.weight",
        ] {
            assert_eq!(hf_name(&gguf_name(n).unwrap()).unwrap(), n);
        }
    }

    #[test]
    fn row_index_matches_unpermute_rows() -> Result<()> {
        let w = Tensor::arange(0f32, 12.0, &Device::Cpu)?.reshape((12, 1))?;
        let want = unpermute_rows(&w, 2)?.flatten_all()?.to_vec1::<f32>()?;
        let got: Vec<f32> = unpermute_index(12, 2).iter().map(|&i| i as f32).collect();
        assert_eq!(got, want);
        Ok(())
    }

    #[test]
    fn permutation_round_trips() -> Result<()> {
        let w = Tensor::arange(0f32, 48.0, &Device::Cpu)?.reshape((12, 4))?;
        let back = unpermute_rows(&permute_rows(&w, 3)?, 3)?;
        assert_eq!(back.to_vec2::<f32>()?, w.to_vec2::<f32>()?);
        // Row order within a head of size 4: HF [0,1,2,3] -> GGUF [0,2,1,3]
        let p = permute_rows(&w, 3)?.to_vec2::<f32>()?;
        assert_eq!(p[1][0], w.to_vec2::<f32>()?[2][0]);
        Ok(())
    }
}
