//! Checkpoint formats: every GGUF tensor type the loader must dequantize, and BERT checkpoints
//! with or without the `bert.` prefix.

mod common;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use metapeft::model::testing::{random_params, tiny_bert_config, tiny_llama_config};
use metapeft::model::{self, Bert};

/// A tiny Llama whose rows are 256 wide, as k-quants need.
fn wide_config() -> metapeft::model::LlamaConfig {
    let mut c = tiny_llama_config();
    c.hidden_size = 256;
    c.intermediate_size = 256;
    c.num_attention_heads = 4;
    c.num_key_value_heads = 2;
    c.head_dim = 64;
    c.vocab_size = 40;
    c
}

#[test]
fn gguf_tensor_types_dequantize_like_ggml() {
    let cfg = wide_config();
    let dir = common::temp_dir("qtypes");
    for dt in [
        GgmlDType::F32,
        GgmlDType::F16,
        GgmlDType::BF16,
        GgmlDType::Q8_0,
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q4K,
        GgmlDType::Q6K,
    ] {
        let path = dir.join(format!("{dt:?}.gguf"));
        let src = common::tiny_gguf(&path, "llama", &cfg, dt);
        let ck = model::load(&path.to_string_lossy(), &Device::Cpu)
            .unwrap_or_else(|e| panic!("{dt:?}: {e}"));
        assert!(ck.storage.contains(&format!("{dt:?}")), "{}", ck.storage);
        for name in [
            "model.layers.1.mlp.down_proj.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.embed_tokens.weight",
        ] {
            let orig = src.get(name).unwrap();
            // What ggml's own round trip gives for this type (GGUF Q/K permutation undone by the loader).
            let want = QTensor::quantize(orig, dt)
                .unwrap()
                .dequantize(&Device::Cpu)
                .unwrap();
            let got = ck.params.get(name).unwrap();
            let rel = common::l2(&(got - &want).unwrap()) / common::l2(&want);
            // Rows are quantized independently, so the permuted Q rows round-trip exactly too.
            assert!(rel < 1e-6, "{dt:?} {name}: relative L2 difference {rel}");
            // And close to the original f32 weights, as far as the type allows.
            let err = common::l2(&(got - orig).unwrap()) / common::l2(orig);
            assert!(err < 0.15, "{dt:?} {name}: error vs f32 {err}");
        }
    }
}

#[test]
fn bert_with_and_without_prefix_and_old_norm_names() {
    let cfg = tiny_bert_config();
    let p = random_params(&Bert::expected_params(&cfg), 9, DType::F32).unwrap();
    let write = |tag: &str, rename: &dyn Fn(&str) -> String| {
        let dir = common::temp_dir(tag);
        let tensors: std::collections::HashMap<String, Tensor> = p
            .iter()
            .map(|(n, t)| (rename(n), t.tensor().clone()))
            .collect();
        candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
        let c = serde_json::json!({
            "model_type": "bert", "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads, "max_position_embeddings": cfg.max_position_embeddings,
            "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu"
        });
        std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
        std::fs::write(dir.join("tokenizer.json"), common::WORDLEVEL_TOKENIZER).unwrap();
        dir
    };
    let plain = write("bert-plain", &|n| n.to_string());
    let prefixed = write("bert-prefixed", &|n| {
        format!("bert.{n}")
            .replace("LayerNorm.weight", "LayerNorm.gamma")
            .replace("LayerNorm.bias", "LayerNorm.beta")
    });
    let a = model::load(&plain.to_string_lossy(), &Device::Cpu).unwrap();
    let b = model::load(&prefixed.to_string_lossy(), &Device::Cpu).unwrap();
    for (name, t) in a.params.iter() {
        let d = (t.tensor() - b.params.get(name).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0, "{name}");
    }
    assert_eq!(a.params.len(), b.params.len());
}
