//! Bad checkpoints give a one-line error naming the file and the problem, a non-zero exit, and
//! never a panic: truncated or corrupted GGUF and safetensors, unknown architectures, a missing
//! tokenizer, tensors of the wrong shape or dtype, missing tensors.

mod common;

use std::path::Path;
use std::process::Command;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use common::{tiny_gguf, tiny_hf_dir};
use metapeft::model::testing::tiny_llama_config;
use metapeft::model::{self, Llama};
use metapeft::params::ParamStore;
use metapeft::peft::DeltaSet;

/// Run `metapeft info <path>`; return (exit code, stderr).
fn info(path: &Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_metapeft"))
        .arg("info")
        .arg(path)
        .env("METAPEFT_NO_PROGRESS", "1")
        .output()
        .expect("run metapeft");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The CLI failed cleanly with one line that mentions every `needle`.
fn assert_clean_error(path: &Path, needles: &[&str]) {
    let (code, err) = info(path);
    assert_eq!(code, 1, "exit code for {}: stderr {err}", path.display());
    assert!(!err.contains("panicked"), "panic: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    for n in needles {
        assert!(
            lines[0].contains(n),
            "error line {:?} does not mention {n:?}",
            lines[0]
        );
    }
}

#[test]
fn tiny_gguf_and_hf_dir_give_the_same_logits() {
    // The GGUF stores Q/K permuted; the loader must undo it to match the Hugging Face layout.
    let dir = common::temp_dir("tiny-gguf");
    let g = dir.join("tiny.gguf");
    tiny_gguf(&g, "llama", &tiny_llama_config(), GgmlDType::F32);
    let hf = tiny_hf_dir("tiny-same", |_, _| {});
    let a = model::load(&g.to_string_lossy(), &Device::Cpu).unwrap();
    let b = model::load(&hf.to_string_lossy(), &Device::Cpu).unwrap();
    let m = Llama::new(tiny_llama_config(), &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[3u32, 5, 7, 11, 13]], &Device::Cpu).unwrap();
    let e = ParamStore::new();
    let la = m
        .forward(&a.params, &DeltaSet::none(), &e, &ids, None)
        .unwrap();
    let lb = m
        .forward(&b.params, &DeltaSet::none(), &e, &ids, None)
        .unwrap();
    let d = (la - lb)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d < 1e-5, "{d}");
}

#[test]
fn truncated_gguf() {
    let src = common::smollm2_path();
    let bytes = std::fs::read(&src).unwrap();
    let dir = common::temp_dir("trunc-gguf");
    let p = dir.join("truncated.gguf");
    std::fs::write(&p, &bytes[..bytes.len() * 2 / 5]).unwrap();
    assert_clean_error(&p, &["truncated.gguf", "truncated"]);
    // Cut inside the header/metadata.
    let p2 = dir.join("header.gguf");
    std::fs::write(&p2, &bytes[..5000]).unwrap();
    assert_clean_error(&p2, &["header.gguf", "not a valid GGUF file"]);
}

#[test]
fn corrupted_and_foreign_files() {
    let dir = common::temp_dir("corrupt");
    let p = dir.join("garbage.gguf");
    let mut junk = b"GGUF".to_vec();
    junk.extend((0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8));
    std::fs::write(&p, &junk).unwrap();
    assert_clean_error(&p, &["garbage.gguf", "not a valid GGUF file"]);
    let q = dir.join("notes.txt");
    std::fs::write(&q, "hello").unwrap();
    assert_clean_error(&q, &["notes.txt", "not a GGUF file"]);
    assert_clean_error(
        &dir.join("does-not-exist.gguf"),
        &["does-not-exist.gguf", "no such file"],
    );
}

#[test]
fn unknown_architectures() {
    let dir = common::temp_dir("arch");
    let g = dir.join("gpt2.gguf");
    tiny_gguf(&g, "gpt2", &tiny_llama_config(), GgmlDType::F32);
    assert_clean_error(&g, &["gpt2.gguf", "unknown architecture `gpt2`"]);
    let hf = tiny_hf_dir("arch-hf", |_, cfg| cfg["model_type"] = "gpt_neox".into());
    assert_clean_error(&hf, &["config.json", "unknown architecture `gpt_neox`"]);
}

#[test]
fn missing_tokenizer_and_config() {
    let hf = tiny_hf_dir("no-tok", |_, _| {});
    std::fs::remove_file(hf.join("tokenizer.json")).unwrap();
    assert_clean_error(&hf, &["no-tok", "missing tokenizer.json"]);
    let hf = tiny_hf_dir("no-cfg", |_, _| {});
    std::fs::remove_file(hf.join("config.json")).unwrap();
    assert_clean_error(&hf, &["config.json", "cannot read"]);
    let hf = tiny_hf_dir("bad-cfg", |_, _| {});
    std::fs::write(hf.join("config.json"), "{\"model_type\": \"llama\", ").unwrap();
    assert_clean_error(&hf, &["config.json", "invalid JSON"]);
}

#[test]
fn wrong_shape_dtype_and_missing_tensors() {
    let hf = tiny_hf_dir("shape", |t, _| {
        t.insert(
            "model.layers.1.self_attn.k_proj.weight".into(),
            Tensor::zeros((16, 8), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    assert_clean_error(
        &hf,
        &[
            "model.layers.1.self_attn.k_proj.weight",
            "[16, 8]",
            "[8, 16]",
        ],
    );
    let hf = tiny_hf_dir("dtype", |t, _| {
        t.insert(
            "model.norm.weight".into(),
            Tensor::zeros(16, DType::I64, &Device::Cpu).unwrap(),
        );
    });
    assert_clean_error(&hf, &["model.safetensors", "model.norm.weight", "I64"]);
    let hf = tiny_hf_dir("missing", |t, _| {
        t.remove("model.layers.0.mlp.up_proj.weight");
    });
    assert_clean_error(&hf, &["model.layers.0.mlp.up_proj.weight", "missing"]);
}

#[test]
fn truncated_safetensors() {
    let hf = tiny_hf_dir("trunc-st", |_, _| {});
    let f = hf.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() - 100]).unwrap();
    assert_clean_error(&hf, &["model.safetensors", "not a valid safetensors file"]);
    std::fs::write(&f, &bytes[..6]).unwrap();
    assert_clean_error(&hf, &["model.safetensors", "not a valid safetensors file"]);
}

#[test]
fn hub_ids_fail_clearly_offline() {
    let out = Command::new(env!("CARGO_BIN_EXE_metapeft"))
        .args(["info", "no-such-org/no-such-model"])
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", common::temp_dir("hub"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("no-such-org/no-such-model") && err.contains("offline"),
        "{err}"
    );
    assert!(!err.contains("panicked"));
}
