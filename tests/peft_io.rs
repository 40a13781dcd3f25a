//! Adapter files: round trips for every method and format (bit-identical tensors, identical
//! logits), GGUF LoRA folding, merged export, and bad adapters rejected whole with a clear error.

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use metapeft::io::{self, AdapterFormat};
use metapeft::model::testing::{random_params, tiny_llama_config, token_ids};
use metapeft::model::{Arch, Llama};
use metapeft::ops::gradcheck::randn_f64;
use metapeft::params::ParamStore;
use metapeft::peft::adapter::{Activation, AdapterKind, BottleneckConfig};
use metapeft::peft::bitfit::BitFitConfig;
use metapeft::peft::ia3::Ia3Config;
use metapeft::peft::ln_tuning::LnTuningConfig;
use metapeft::peft::lora::{LoraConfig, LoraInit};
use metapeft::peft::prefix::PrefixTuningConfig;
use metapeft::peft::prompt::PromptTuningConfig;
use metapeft::peft::targets::TargetModules;
use metapeft::peft::tarp::{TarpConfig, TarpVariant};
use metapeft::peft::{Adapter, DeltaConfig, DeltaSet};

fn base() -> (Llama, ParamStore, Arch) {
    let cfg = tiny_llama_config();
    let p = random_params(&Llama::expected_params(&cfg), 1, DType::F32).unwrap();
    (
        Llama::new(cfg.clone(), &Device::Cpu).unwrap(),
        p,
        Arch::Llama(cfg),
    )
}

fn list(v: &[&str]) -> TargetModules {
    TargetModules::List(v.iter().map(|s| s.to_string()).collect())
}

fn lora_patterns() -> LoraConfig {
    let mut c = LoraConfig::new(4, 16.0, &[]);
    c.target_modules = TargetModules::Regex(r".*\.(q_proj|k_proj|o_proj|up_proj)".into());
    c.use_rslora = true;
    c.rank_pattern.insert("o_proj".into(), 2);
    c.alpha_pattern.insert("up_proj".into(), 4.0);
    c.init_lora_weights = LoraInit::Default(false);
    c
}

fn configs() -> Vec<DeltaConfig> {
    vec![
        DeltaConfig::Lora(lora_patterns()),
        DeltaConfig::Ia3(Ia3Config {
            target_modules: list(&["k_proj", "v_proj", "down_proj"]),
            feedforward_modules: list(&["down_proj"]),
            init_ia3_weights: false,
        }),
        DeltaConfig::PromptTuning(PromptTuningConfig {
            num_virtual_tokens: 3,
            prompt_tuning_init: "RANDOM".into(),
        }),
        DeltaConfig::PrefixTuning(PrefixTuningConfig {
            num_virtual_tokens: 2,
            prefix_projection: true,
            encoder_hidden_size: 8,
        }),
        DeltaConfig::Bitfit(BitFitConfig::default()),
        DeltaConfig::LnTuning(LnTuningConfig::default()),
        DeltaConfig::Tarp(TarpConfig {
            variant: TarpVariant::Kronecker,
            r: 2,
            target_modules: list(&["q_proj", "down_proj"]),
            multiplicative: true,
            kron_n: 2,
        }),
        DeltaConfig::Tarp(TarpConfig {
            variant: TarpVariant::Dynamic,
            r: 2,
            target_modules: list(&["v_proj"]),
            multiplicative: true,
            kron_n: 2,
        }),
        DeltaConfig::Adapter(BottleneckConfig {
            kind: AdapterKind::Houlsby,
            reduction_factor: 4,
            activation: Activation::Gelu,
            scaling: 1.0,
        }),
    ]
}

/// Every parameter moved away from its init so each method visibly acts.
fn trained(cfg: &DeltaConfig, arch: &Arch, base: &ParamStore) -> Adapter {
    let a = cfg.init(arch, base, 7).unwrap();
    let mut p = ParamStore::new();
    for (i, (n, t)) in a.params.iter().enumerate() {
        let t = t.tensor();
        let noise = randn_f64(t.dims(), 50 + i as u64, 0.2)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        p.insert_trainable(n, Var::from_tensor(&(t + noise).unwrap()).unwrap());
    }
    Adapter {
        config: a.config,
        params: p,
    }
}

fn logits(m: &Llama, base: &ParamStore, a: &Adapter, arch: &Arch) -> Tensor {
    let d = a.attach(arch, base).unwrap();
    m.forward(base, &d, &a.params, &token_ids(2, 5, 32, 3).unwrap(), None)
        .unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn round_trips_are_exact_for_every_method_and_format() {
    let (m, base, arch) = base();
    for cfg in configs() {
        let a = trained(&cfg, &arch, &base);
        let want = logits(&m, &base, &a, &arch);
        let peft_ok = matches!(
            cfg,
            DeltaConfig::Lora(_)
                | DeltaConfig::Ia3(_)
                | DeltaConfig::PromptTuning(_)
                | DeltaConfig::PrefixTuning(_)
        );
        for format in [AdapterFormat::Native, AdapterFormat::Peft] {
            let dir = common::temp_dir(&format!("rt-{}-{format:?}", cfg.method()));
            let saved = io::save_adapter(&a, &arch, "tiny", &dir, format);
            if format == AdapterFormat::Peft && !peft_ok {
                let err = saved.unwrap_err().to_string();
                assert!(err.contains("native"), "{err}");
                continue;
            }
            saved.unwrap();
            let b = io::load_adapter(&dir, &arch, &base).unwrap();
            let got = logits(&m, &base, &b, &arch);
            let d = max_diff(&got, &want);
            if matches!(cfg, DeltaConfig::PrefixTuning(_)) && format == AdapterFormat::Peft {
                // Saved folded (the MLP evaluated once): same function up to float rounding.
                assert!(d < 1e-5, "{} {format:?}: {d}", cfg.method());
                continue;
            }
            assert_eq!(d, 0.0, "{} {format:?}: logits differ by {d}", cfg.method());
            assert_eq!(b.config, a.config, "{} {format:?}", cfg.method());
            for (n, t) in a.params.iter() {
                let u = b.params.get(n).unwrap();
                assert_eq!(
                    max_diff(t.tensor(), u),
                    0.0,
                    "{} {format:?}: tensor {n}",
                    cfg.method()
                );
            }
        }
    }
}

#[test]
fn peft_files_use_peft_names_and_shapes() {
    let (_m, base, arch) = base();
    let a = trained(&DeltaConfig::Lora(lora_patterns()), &arch, &base);
    let dir = common::temp_dir("peft-names");
    io::save_adapter(&a, &arch, "tiny", &dir, AdapterFormat::Peft).unwrap();
    let tensors = io::load_safetensors(&dir.join("adapter_model.safetensors")).unwrap();
    let get = |n: &str| {
        tensors
            .iter()
            .find(|(k, _)| k == n)
            .unwrap_or_else(|| panic!("{n} missing"))
            .1
            .dims()
            .to_vec()
    };
    assert_eq!(
        get("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"),
        vec![4, 16]
    );
    assert_eq!(
        get("base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"),
        vec![8, 4]
    );
    assert_eq!(
        get("base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight"),
        vec![2, 16]
    );
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    assert_eq!(cfg["use_rslora"], true);
    assert_eq!(cfg["rank_pattern"]["o_proj"], 2);
    assert!(cfg["target_modules"].is_string());
}

#[test]
fn gguf_lora_folds_scales_and_permutes_q_k() {
    let (m, base, arch) = base();
    let a = trained(&DeltaConfig::Lora(lora_patterns()), &arch, &base);
    let dir = common::temp_dir("gguf-lora");
    let path = dir.join("lora.gguf");
    io::gguf_lora::write(&a, &arch, &base, &path).unwrap();
    // The file's metadata is what llama.cpp expects.
    let (ct, _) = metapeft::model::load::gguf::read_content(&path).unwrap();
    let s = |k: &str| ct.metadata[k].to_string().unwrap().clone();
    assert_eq!(s("general.type"), "adapter");
    assert_eq!(s("adapter.type"), "lora");
    assert_eq!(s("general.architecture"), "llama");
    assert_eq!(ct.metadata["adapter.lora.alpha"].to_f32().unwrap(), 16.0);
    let info = &ct.tensor_infos["blk.0.attn_q.weight.lora_a"];
    assert_eq!(
        info.shape.dims(),
        &[4, 16],
        "[r, in] as PEFT (ggml ne = [in, r])"
    );
    assert!(ct.tensor_infos.contains_key("blk.1.ffn_up.weight.lora_b"));
    // Read back: same function, with every module's scale expressed as alpha / r.
    let b = io::gguf_lora::read(&path, &arch, &base).unwrap();
    let d = max_diff(&logits(&m, &base, &b, &arch), &logits(&m, &base, &a, &arch));
    assert!(d < 1e-5, "{d}");
    // The merged weights agree too, module by module.
    let ma = a
        .attach(&arch, &base)
        .unwrap()
        .merge(&base, &a.params)
        .unwrap();
    let mb = b
        .attach(&arch, &base)
        .unwrap()
        .merge(&base, &b.params)
        .unwrap();
    for (n, t) in ma.iter() {
        assert!(max_diff(t.tensor(), mb.get(n).unwrap()) < 1e-6, "{n}");
    }
}

#[test]
fn merged_export_loads_back_with_the_same_logits() {
    let (m, base, arch) = base();
    let hf = common::tiny_hf_dir("merge-base", |_, _| {});
    let ck = metapeft::model::load(&hf.to_string_lossy(), &Device::Cpu).unwrap();
    for cfg in [
        DeltaConfig::Lora(lora_patterns()),
        DeltaConfig::Bitfit(BitFitConfig::default()),
        DeltaConfig::Ia3(Ia3Config {
            target_modules: list(&["v_proj", "down_proj"]),
            feedforward_modules: list(&["down_proj"]),
            init_ia3_weights: false,
        }),
    ] {
        let a = trained(&cfg, &arch, &base);
        let want = logits(&m, &base, &a, &arch);
        let out = common::temp_dir(&format!("merged-{}", cfg.method()));
        let d = a.attach(&arch, &ck.params).unwrap();
        io::merged::write_merged(&ck, &d, &a.params, &out).unwrap();
        let merged = metapeft::model::load(&out.to_string_lossy(), &Device::Cpu).unwrap();
        let Arch::Llama(mc) = &merged.arch else {
            panic!()
        };
        let mm = Llama::new(mc.clone(), &Device::Cpu).unwrap();
        let got = mm
            .forward(
                &merged.params,
                &DeltaSet::none(),
                &ParamStore::new(),
                &token_ids(2, 5, 32, 3).unwrap(),
                None,
            )
            .unwrap();
        let diff = max_diff(&got, &want);
        assert!(diff < 1e-5, "{}: {diff}", cfg.method());
    }
    let a = trained(
        &DeltaConfig::PromptTuning(PromptTuningConfig {
            num_virtual_tokens: 2,
            prompt_tuning_init: "RANDOM".into(),
        }),
        &arch,
        &base,
    );
    let d = a.attach(&arch, &ck.params).unwrap();
    let err = io::merged::write_merged(&ck, &d, &a.params, &common::temp_dir("merged-prompt"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot be merged"), "{err}");
}

fn write_lora_peft(dir: &Path) {
    let (_m, base, arch) = base();
    let a = trained(
        &DeltaConfig::Lora(LoraConfig::new(2, 4.0, &["q_proj", "v_proj"])),
        &arch,
        &base,
    );
    io::save_adapter(&a, &arch, "tiny", dir, AdapterFormat::Peft).unwrap();
}

#[test]
fn bad_adapters_fail_whole_with_a_clear_error() {
    let (_m, base, arch) = base();
    let check = |dir: &Path, needles: &[&str]| {
        let err = io::load_adapter(dir, &arch, &base).unwrap_err().to_string();
        for n in needles {
            assert!(err.contains(n), "error {err:?} does not mention {n:?}");
        }
    };
    // Unknown peft_type.
    let d = common::temp_dir("bad-type");
    write_lora_peft(&d);
    let cfg = std::fs::read_to_string(d.join("adapter_config.json"))
        .unwrap()
        .replace("\"LORA\"", "\"LOHA\"");
    std::fs::write(d.join("adapter_config.json"), cfg).unwrap();
    check(&d, &["adapter_config.json", "LOHA", "not supported"]);
    // Malformed config.
    let d = common::temp_dir("bad-json");
    write_lora_peft(&d);
    std::fs::write(
        d.join("adapter_config.json"),
        "{\"peft_type\": \"LORA\", \"r\": ",
    )
    .unwrap();
    check(&d, &["adapter_config.json", "invalid JSON"]);
    let d = common::temp_dir("bad-field");
    write_lora_peft(&d);
    std::fs::write(d.join("adapter_config.json"), "{\"peft_type\": \"LORA\", \"r\": \"eight\", \"lora_alpha\": 8, \"target_modules\": [\"q_proj\"]}").unwrap();
    check(&d, &["adapter_config.json", "bad LORA config"]);
    // An option that changes the computation and is not implemented.
    let d = common::temp_dir("bad-dora");
    write_lora_peft(&d);
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("adapter_config.json")).unwrap())
            .unwrap();
    v["use_dora"] = true.into();
    std::fs::write(d.join("adapter_config.json"), v.to_string()).unwrap();
    check(&d, &["use_dora", "not supported"]);
    // Targets the base does not have.
    let d = common::temp_dir("bad-targets");
    write_lora_peft(&d);
    let cfg = std::fs::read_to_string(d.join("adapter_config.json"))
        .unwrap()
        .replace("q_proj", "c_attn");
    std::fs::write(d.join("adapter_config.json"), cfg).unwrap();
    check(&d, &["bad-targets", "matches no module"]);
    // Shapes for another base (a rank-2 adapter whose config claims r = 3).
    let d = common::temp_dir("bad-shape");
    write_lora_peft(&d);
    let cfg = std::fs::read_to_string(d.join("adapter_config.json"))
        .unwrap()
        .replace("\"r\": 2", "\"r\": 3");
    std::fs::write(d.join("adapter_config.json"), cfg).unwrap();
    check(&d, &["lora_A.weight", "[2, 16]", "[3, 16]"]);
    // Truncated weights.
    let d = common::temp_dir("bad-trunc");
    write_lora_peft(&d);
    let w = d.join("adapter_model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    check(
        &d,
        &["adapter_model.safetensors", "not a valid safetensors file"],
    );
    // Not an adapter at all.
    let d = common::temp_dir("bad-empty");
    check(&d, &["not an adapter directory"]);
    // A native adapter from the future.
    let d = common::temp_dir("bad-version");
    let a = trained(&DeltaConfig::Bitfit(BitFitConfig::default()), &arch, &base);
    io::save_adapter(&a, &arch, "tiny", &d, AdapterFormat::Native).unwrap();
    let cfg = std::fs::read_to_string(d.join("metapeft_adapter.json"))
        .unwrap()
        .replace("\"format_version\": 1", "\"format_version\": 9");
    std::fs::write(d.join("metapeft_adapter.json"), cfg).unwrap();
    check(&d, &["format_version 9"]);
}
