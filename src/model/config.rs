//! Model configurations, read from a Hugging Face `config.json` or from GGUF metadata.

use serde::{Deserialize, Serialize};

use crate::ops::rope::RopeScaling;

/// A Llama-family decoder: Llama 2/3, SmolLM, Mistral, Qwen2.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// `llama`, `mistral` or `qwen2`.
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on the q, k, v projections (always on for Qwen2) and, except for Qwen2, on o.
    pub attention_bias: bool,
    /// Bias on the gate, up and down projections.
    #[serde(default)]
    pub mlp_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// A BERT-family encoder.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    pub hidden_act: String,
    pub pad_token_id: u32,
}

impl LlamaConfig {
    pub const MODEL_TYPES: [&'static str; 3] = ["llama", "mistral", "qwen2"];

    /// Parse a Hugging Face `config.json` value. `Err` holds a message naming the missing or bad key.
    pub fn from_hf_json(v: &serde_json::Value) -> std::result::Result<Self, String> {
        let model_type = str_key(v, "model_type")?;
        if !Self::MODEL_TYPES.contains(&model_type.as_str()) {
            return Err(format!(
                "unknown architecture `{model_type}` (supported decoders: {})",
                Self::MODEL_TYPES.join(", ")
            ));
        }
        let hidden = usize_key(v, "hidden_size")?;
        let heads = usize_key(v, "num_attention_heads")?;
        let kv = opt_usize(v, "num_key_value_heads").unwrap_or(heads);
        let head_dim = opt_usize(v, "head_dim").unwrap_or(hidden / heads.max(1));
        let eos_token_ids = match v.get("eos_token_id") {
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|x| x.as_u64())
                .map(|x| x as u32)
                .collect(),
            Some(x) => x.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
            None => vec![],
        };
        let cfg = LlamaConfig {
            attention_bias: model_type == "qwen2"
                || v.get("attention_bias")
                    .and_then(|b| b.as_bool())
                    .unwrap_or(false),
            mlp_bias: v.get("mlp_bias").and_then(|b| b.as_bool()).unwrap_or(false),
            model_type,
            vocab_size: usize_key(v, "vocab_size")?,
            hidden_size: hidden,
            intermediate_size: usize_key(v, "intermediate_size")?,
            num_hidden_layers: usize_key(v, "num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim,
            rms_norm_eps: v
                .get("rms_norm_eps")
                .and_then(|x| x.as_f64())
                .unwrap_or(1e-6),
            rope_theta: v
                .get("rope_theta")
                .and_then(|x| x.as_f64())
                .unwrap_or(10000.0),
            rope_scaling: parse_rope_scaling(v.get("rope_scaling"))?,
            max_position_embeddings: opt_usize(v, "max_position_embeddings").unwrap_or(4096),
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(|x| x.as_bool())
                .unwrap_or(false),
            bos_token_id: opt_usize(v, "bos_token_id").map(|x| x as u32),
            eos_token_ids,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.num_attention_heads == 0 || self.num_key_value_heads == 0 {
            return Err("head counts must be positive".into());
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!("head_dim {} must be even for RoPE", self.head_dim));
        }
        Ok(())
    }

    /// The `config.json` a Hugging Face `transformers` install loads.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let arch = match self.model_type.as_str() {
            "qwen2" => "Qwen2ForCausalLM",
            "mistral" => "MistralForCausalLM",
            _ => "LlamaForCausalLM",
        };
        let mut v = serde_json::json!({
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "torch_dtype": "float32",
        });
        if let Some(b) = self.bos_token_id {
            v["bos_token_id"] = b.into();
        }
        match self.eos_token_ids.as_slice() {
            [] => {}
            [e] => v["eos_token_id"] = (*e).into(),
            many => v["eos_token_id"] = many.to_vec().into(),
        }
        if let Some(s) = &self.rope_scaling {
            v["rope_scaling"] = serde_json::to_value(s).unwrap_or_default();
        }
        v
    }

    pub fn num_params(&self) -> usize {
        let (d, f, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let mut bias = if self.attention_bias { q + 2 * kv } else { 0 };
        if self.attention_bias && self.model_type != "qwen2" {
            bias += d;
        }
        if self.mlp_bias {
            bias += 2 * f + d;
        }
        let layer = d * q + 2 * d * kv + q * d + bias + 3 * d * f + 2 * d;
        let head = if self.tie_word_embeddings { 0 } else { v * d };
        v * d + self.num_hidden_layers * layer + d + head
    }
}

impl BertConfig {
    pub fn from_hf_json(v: &serde_json::Value) -> std::result::Result<Self, String> {
        let act = v
            .get("hidden_act")
            .and_then(|x| x.as_str())
            .unwrap_or("gelu")
            .to_string();
        if act != "gelu" {
            return Err(format!(
                "hidden_act `{act}` is not supported (only exact `gelu`)"
            ));
        }
        if let Some(p) = v.get("position_embedding_type").and_then(|x| x.as_str()) {
            if p != "absolute" {
                return Err(format!("position_embedding_type `{p}` is not supported"));
            }
        }
        Ok(BertConfig {
            vocab_size: usize_key(v, "vocab_size")?,
            hidden_size: usize_key(v, "hidden_size")?,
            intermediate_size: usize_key(v, "intermediate_size")?,
            num_hidden_layers: usize_key(v, "num_hidden_layers")?,
            num_attention_heads: usize_key(v, "num_attention_heads")?,
            max_position_embeddings: opt_usize(v, "max_position_embeddings").unwrap_or(512),
            type_vocab_size: opt_usize(v, "type_vocab_size").unwrap_or(2),
            layer_norm_eps: v
                .get("layer_norm_eps")
                .and_then(|x| x.as_f64())
                .unwrap_or(1e-12),
            hidden_act: act,
            pad_token_id: opt_usize(v, "pad_token_id").unwrap_or(0) as u32,
        })
    }
}

fn str_key(v: &serde_json::Value, k: &str) -> std::result::Result<String, String> {
    v.get(k)
        .and_then(|x| x.as_str())
        .map(str::to_string)
        .ok_or_else(|| format!("missing string key `{k}`"))
}

fn usize_key(v: &serde_json::Value, k: &str) -> std::result::Result<usize, String> {
    opt_usize(v, k).ok_or_else(|| format!("missing integer key `{k}`"))
}

fn opt_usize(v: &serde_json::Value, k: &str) -> Option<usize> {
    v.get(k).and_then(|x| x.as_u64()).map(|x| x as usize)
}

fn parse_rope_scaling(
    v: Option<&serde_json::Value>,
) -> std::result::Result<Option<RopeScaling>, String> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(|x| x.as_str())
        .unwrap_or("default");
    let f = |k: &str| {
        v.get(k)
            .and_then(|x| x.as_f64())
            .ok_or_else(|| format!("rope_scaling: missing `{k}`"))
    };
    match kind {
        "default" => Ok(None),
        "linear" => Ok(Some(RopeScaling::Linear {
            factor: f("factor")?,
        })),
        "llama3" => Ok(Some(RopeScaling::Llama3 {
            factor: f("factor")?,
            low_freq_factor: f("low_freq_factor")?,
            high_freq_factor: f("high_freq_factor")?,
            original_max_position_embeddings: f("original_max_position_embeddings")? as usize,
        })),
        other => Err(format!(
            "rope_scaling type `{other}` is not supported (default, linear, llama3)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_llama3_and_qwen2_configs() {
        let v = serde_json::json!({
            "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
            "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "eos_token_id": [128001, 128008, 128009], "bos_token_id": 128000
        });
        let c = LlamaConfig::from_hf_json(&v).unwrap();
        assert_eq!(c.head_dim, 128);
        assert_eq!(c.eos_token_ids, vec![128001, 128008, 128009]);
        assert!(matches!(c.rope_scaling, Some(RopeScaling::Llama3 { .. })));
        // 8.03B parameters for Llama 3.1 8B
        assert_eq!(c.num_params(), 8_030_261_248);
        let back = LlamaConfig::from_hf_json(&c.to_hf_json()).unwrap();
        assert_eq!(back, c);

        let q = serde_json::json!({
            "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
            "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
            "tie_word_embeddings": true, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0
        });
        let c = LlamaConfig::from_hf_json(&q).unwrap();
        assert!(c.attention_bias);
        // Qwen2-0.5B: 494M parameters
        assert_eq!(c.num_params(), 494_032_768);
    }

    #[test]
    fn rejects_unknown_architecture_and_bad_heads() {
        let v = serde_json::json!({"model_type": "gpt_neox"});
        assert!(LlamaConfig::from_hf_json(&v)
            .unwrap_err()
            .contains("gpt_neox"));
        let v = serde_json::json!({
            "model_type": "llama", "vocab_size": 10, "hidden_size": 12, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 3, "num_key_value_heads": 2
        });
        assert!(LlamaConfig::from_hf_json(&v)
            .unwrap_err()
            .contains("multiple"));
    }
}
