//! Shared helpers for the integration tests: the real registry models, loaded once per test binary.
//! A missing asset is fetched; if it cannot be fetched the test fails (it never skips).
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::Device;
use metapeft::assets::{self, Asset};
use metapeft::model::{self, Checkpoint};

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
