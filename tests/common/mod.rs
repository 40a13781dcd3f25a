//! Shared helpers for the integration tests: the real registry models, loaded once per test binary.
//! A missing asset is fetched; if it cannot be fetched the test fails (it never skips).
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use metapeft::assets::{self, Asset};
use metapeft::model::testing::{random_params, tiny_llama, tiny_llama_config};
use metapeft::model::{self, Checkpoint, Llama, LlamaConfig};
use metapeft::params::ParamStore;

pub fn asset(a: Asset) -> PathBuf {
    match assets::ensure(a) {
        Ok(p) => p,
        Err(e) => panic!(
            "test asset unavailable ({e}). The tests need it; fetch it with `cargo run --release -- assets fetch` \
             (set METAPEFT_HOME to choose where)"
        ),
    }
}

pub fn smollm2_path() -> PathBuf {
    asset(assets::SMOLLM2)
}

pub fn minilm_path() -> PathBuf {
    asset(assets::MINILM)
}

pub fn smollm2() -> &'static Checkpoint {
    static CK: OnceLock<Checkpoint> = OnceLock::new();
    CK.get_or_init(|| {
        model::load(&smollm2_path().to_string_lossy(), &Device::Cpu).expect("load SmolLM2")
    })
}

pub fn minilm() -> &'static Checkpoint {
    static CK: OnceLock<Checkpoint> = OnceLock::new();
    CK.get_or_init(|| {
        model::load(&minilm_path().to_string_lossy(), &Device::Cpu).expect("load MiniLM")
    })
}

/// Run the `metapeft` binary with the default models in the cache; (exit code, stdout, stderr).
pub fn metapeft(args: &[&str]) -> (i32, String, String) {
    smollm2_path();
    minilm_path();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_metapeft"))
        .args(args)
        .env("METAPEFT_NO_PROGRESS", "1")
        .output()
        .expect("run metapeft");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The L2 norm of a tensor.
pub fn l2(t: &Tensor) -> f32 {
    t.sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .sqrt()
}

/// Every variable received a finite, non-zero gradient.
pub fn assert_every_var_has_gradient(
    grads: &candle_core::backprop::GradStore,
    vars: &[(String, candle_core::Var)],
) {
    for (name, v) in vars {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let norm = l2(g);
        assert!(
            norm.is_finite() && norm > 0.0,
            "{name}: gradient norm {norm}"
        );
    }
}

pub fn fixture(name: &str) -> serde_json::Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let s = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A fresh temporary directory for one test.
pub fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("metapeft-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create temp dir");
    d
}

pub const WORDLEVEL_TOKENIZER: &str = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
"normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,
"model":{"type":"WordLevel","vocab":{"<unk>":0,"a":1,"b":2},"unk_token":"<unk>"}}"#;

/// A tiny Llama as a Hugging Face directory.
pub fn tiny_hf_dir(
    tag: &str,
    edit: impl FnOnce(&mut HashMap<String, Tensor>, &mut serde_json::Value),
) -> PathBuf {
    let dir = temp_dir(tag);
    let (_m, p) = tiny_llama(1, DType::F32).unwrap();
    let mut tensors: HashMap<String, Tensor> = p
        .iter()
        .map(|(n, t)| (n.to_string(), t.tensor().clone()))
        .collect();
    let mut cfg = tiny_llama_config().to_hf_json();
    edit(&mut tensors, &mut cfg);
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    std::fs::write(dir.join("tokenizer.json"), WORDLEVEL_TOKENIZER).unwrap();
    dir
}

/// A random Llama of config `cfg` as GGUF with 2-d weights stored as `dtype` (norms stay f32),
/// Q/K rows permuted as llama.cpp's converter does. Returns the f32 parameters it was made from.
pub fn tiny_gguf(path: &Path, arch: &str, cfg: &LlamaConfig, dtype: GgmlDType) -> ParamStore {
    let p = random_params(&Llama::expected_params(cfg), 1, DType::F32).unwrap();
    let mut tensors: Vec<(String, QTensor)> = vec![];
    for (name, t) in p.iter() {
        let mut t = t.tensor().clone();
        if name.contains("q_proj") {
            t = metapeft::model::load::gguf::permute_rows(&t, cfg.num_attention_heads).unwrap();
        } else if name.contains("k_proj") {
            t = metapeft::model::load::gguf::permute_rows(&t, cfg.num_key_value_heads).unwrap();
        }
        let dt = if t.rank() == 2 { dtype } else { GgmlDType::F32 };
        tensors.push((
            metapeft::model::load::gguf::gguf_name(name).unwrap(),
            QTensor::quantize(&t, dt).unwrap(),
        ));
    }
    let tokens: Vec<Value> = (0..cfg.vocab_size)
        .map(|i| {
            Value::String(match i {
                0 => "a".into(),
                1 => "b".into(),
                2 => "ab".into(),
                i => format!("t{i}"),
            })
        })
        .collect();
    let a = |k: &str| format!("{arch}.{k}");
    let meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (a("block_count"), Value::U32(cfg.num_hidden_layers as u32)),
        (a("embedding_length"), Value::U32(cfg.hidden_size as u32)),
        (
            a("feed_forward_length"),
            Value::U32(cfg.intermediate_size as u32),
        ),
        (
            a("attention.head_count"),
            Value::U32(cfg.num_attention_heads as u32),
        ),
        (
            a("attention.head_count_kv"),
            Value::U32(cfg.num_key_value_heads as u32),
        ),
        (
            a("attention.layer_norm_rms_epsilon"),
            Value::F32(cfg.rms_norm_eps as f32),
        ),
        (a("rope.freq_base"), Value::F32(cfg.rope_theta as f32)),
        (
            a("context_length"),
            Value::U32(cfg.max_position_embeddings as u32),
        ),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(vec![Value::String("a b".into())]),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
    ];
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &meta_refs, &tensor_refs).unwrap();
    p
}
