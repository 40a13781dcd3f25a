//! Method tests on tiny random models: init semantics, merge exactness, gradient flow against
//! finite differences, KV-cache consistency, and parameter checks.

use candle_core::{DType, Device, Tensor};

use super::adapter::{Activation, AdapterKind, BottleneckConfig};
use super::bitfit::BitFitConfig;
use super::ia3::Ia3Config;
use super::ln_tuning::LnTuningConfig;
use super::lora::{LoraConfig, LoraInit};
use super::prefix::PrefixTuningConfig;
use super::prompt::PromptTuningConfig;
use super::targets::TargetModules;
use super::tarp::{TarpConfig, TarpVariant};
use super::{Adapter, DeltaConfig, DeltaSet};
use crate::model::testing::{tiny_llama, token_ids};
use crate::model::{Arch, KvCache, Llama};
use crate::ops::gradcheck;
use crate::params::ParamStore;
use crate::Result;

fn list(v: &[&str]) -> TargetModules {
    TargetModules::List(v.iter().map(|s| s.to_string()).collect())
}

fn all_configs() -> Vec<DeltaConfig> {
    vec![
        DeltaConfig::Lora(LoraConfig::new(2, 4.0, &["q_proj", "v_proj", "down_proj"])),
        DeltaConfig::Ia3(Ia3Config {
            target_modules: list(&["k_proj", "v_proj", "down_proj"]),
            feedforward_modules: list(&["down_proj"]),
            init_ia3_weights: true,
        }),
        DeltaConfig::Bitfit(BitFitConfig::default()),
        DeltaConfig::LnTuning(LnTuningConfig::default()),
        DeltaConfig::PromptTuning(PromptTuningConfig {
            num_virtual_tokens: 3,
            prompt_tuning_init: "RANDOM".into(),
        }),
        DeltaConfig::PrefixTuning(PrefixTuningConfig {
            num_virtual_tokens: 2,
            prefix_projection: true,
            encoder_hidden_size: 8,
        }),
        tarp(TarpVariant::Bilinear, true),
        tarp(TarpVariant::Kronecker, true),
        tarp(TarpVariant::Dynamic, true),
        tarp(TarpVariant::Dynamic, false),
        adapter(AdapterKind::Houlsby, Activation::Gelu),
        adapter(AdapterKind::Pfeiffer, Activation::Relu),
        adapter(AdapterKind::Parallel, Activation::Silu),
    ]
}

fn tarp(variant: TarpVariant, multiplicative: bool) -> DeltaConfig {
    DeltaConfig::Tarp(TarpConfig {
        variant,
        r: 2,
        target_modules: list(&["q_proj", "v_proj", "down_proj"]),
        multiplicative,
        kron_n: 2,
    })
}

fn adapter(kind: AdapterKind, activation: Activation) -> DeltaConfig {
    DeltaConfig::Adapter(BottleneckConfig {
        kind,
        reduction_factor: 4,
        activation,
        scaling: 2.0,
    })
}

fn is_exact_identity_at_init(c: &DeltaConfig) -> bool {
    !matches!(
        c,
        DeltaConfig::PromptTuning(_) | DeltaConfig::PrefixTuning(_) | DeltaConfig::Adapter(_)
    )
}

fn mergeable(c: &DeltaConfig) -> bool {
    match c {
        DeltaConfig::PromptTuning(_) | DeltaConfig::PrefixTuning(_) | DeltaConfig::Adapter(_) => {
            false
        }
        DeltaConfig::Tarp(t) => t.variant != TarpVariant::Dynamic,
        _ => true,
    }
}

fn setup(dtype: DType) -> Result<(Llama, ParamStore, Arch)> {
    let (m, p) = tiny_llama(11, dtype)?;
    let arch = Arch::Llama(m.cfg.clone());
    Ok((m, p, arch))
}

fn logits(
    m: &Llama,
    base: &ParamStore,
    d: &DeltaSet,
    dp: &ParamStore,
    ids: &Tensor,
) -> Result<Tensor> {
    m.forward(base, d, dp, ids, None)
}

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    Ok((a - b)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?)
}

/// Perturb every parameter so that identity-initialised deltas act.
fn perturbed(a: &Adapter, seed: u64) -> Result<Adapter> {
    let mut p = ParamStore::new();
    for (i, (name, t)) in a.params.iter().enumerate() {
        let t = t.tensor();
        let noise = gradcheck::randn_f64(t.dims(), seed + i as u64, 0.3)?.to_dtype(t.dtype())?;
        p.insert_trainable(name, candle_core::Var::from_tensor(&(t + noise)?)?);
    }
    Ok(Adapter {
        config: a.config.clone(),
        params: p,
    })
}

#[test]
fn identity_at_init_for_lora_ia3_bitfit_ln() -> Result<()> {
    let (m, base, arch) = setup(DType::F32)?;
    let ids = token_ids(2, 5, 32, 1)?;
    let plain = logits(&m, &base, &DeltaSet::none(), &ParamStore::new(), &ids)?;
    for cfg in all_configs() {
        let a = cfg.init(&arch, &base, 3)?;
        let d = a.attach(&arch, &base)?;
        let got = logits(&m, &base, &d, &a.params, &ids)?;
        let diff = max_diff(&got, &plain)?;
        if is_exact_identity_at_init(&cfg) {
            assert!(diff < 1e-5, "{} at init differs by {diff}", cfg.method());
        } else if matches!(cfg, DeltaConfig::Adapter(_)) {
            // Near-identity: N(0, 0.01) projections.
            assert!(
                diff > 0.0 && diff < 0.05,
                "adapter at init differs by {diff}"
            );
        }
    }
    Ok(())
}

#[test]
fn mergeable_methods_merge_exactly() -> Result<()> {
    let (m, base, arch) = setup(DType::F32)?;
    let ids = token_ids(2, 5, 32, 2)?;
    let plain = logits(&m, &base, &DeltaSet::none(), &ParamStore::new(), &ids)?;
    for cfg in all_configs() {
        let a = perturbed(&cfg.init(&arch, &base, 4)?, 100)?;
        let d = a.attach(&arch, &base)?;
        let with_delta = logits(&m, &base, &d, &a.params, &ids)?;
        assert!(
            max_diff(&with_delta, &plain)? > 1e-3,
            "{} changes nothing",
            cfg.method()
        );
        match mergeable(&cfg) {
            false => {
                let err = d.merge(&base, &a.params).unwrap_err().to_string();
                assert!(err.contains("cannot be merged"), "{err}");
            }
            true => {
                let merged = d.merge(&base, &a.params)?;
                let got = logits(&m, &merged, &DeltaSet::none(), &ParamStore::new(), &ids)?;
                let diff = max_diff(&got, &with_delta)?;
                assert!(diff < 1e-5, "{}: merged differs by {diff}", cfg.method());
                match d.unmerge(&merged, &a.params) {
                    Ok(back) => {
                        for (n, t) in base.iter() {
                            let e = max_diff(t.tensor(), back.get(n)?)?;
                            assert!(e < 1e-5, "{}: unmerged {n} differs by {e}", cfg.method());
                        }
                    }
                    Err(e) => assert!(
                        matches!(cfg, DeltaConfig::Bitfit(_) | DeltaConfig::LnTuning(_)),
                        "{}: {e}",
                        cfg.method()
                    ),
                }
            }
        }
    }
    Ok(())
}

#[test]
fn every_method_passes_finite_differences_in_f64() -> Result<()> {
    let (m, base, arch) = setup(DType::F64)?;
    let ids = token_ids(1, 4, 32, 3)?;
    for cfg in all_configs() {
        let a = perturbed(&cfg.init(&arch, &base, 5)?, 200)?;
        let params = a.params.to_dtype(DType::F64)?;
        let d = a.config.build(&arch, &base, &params)?;
        let mut set = DeltaSet::none();
        set.push_boxed(d);
        // Check the first tensor (every element) and the last one.
        let names: Vec<String> = params.names().map(String::from).collect();
        let picked: Vec<String> = if names.len() > 1 {
            vec![names[0].clone(), names[names.len() - 1].clone()]
        } else {
            names.clone()
        };
        let inputs: Vec<Tensor> = picked
            .iter()
            .map(|n| params.get(n).cloned())
            .collect::<Result<_>>()?;
        let f = |xs: &[Tensor]| -> candle_core::Result<Tensor> {
            let mut s = ParamStore::new();
            for (n, p) in params.iter() {
                match picked.iter().position(|q| q == n) {
                    Some(i) => s.insert_frozen(n, xs[i].clone()),
                    None => s.insert_frozen(n, p.tensor().clone()),
                }
            }
            let l = m
                .forward(&base, &set, &s, &ids, None)
                .map_err(candle_core::Error::wrap)?;
            crate::ops::cross_entropy(&l.narrow(1, 0, 3)?, &ids.narrow(1, 1, 3)?, -100)
        };
        let err = gradcheck::check(f, &inputs, 1e-6)?;
        assert!(err < 1e-6, "{}: rel error {err}", cfg.method());
    }
    Ok(())
}

#[test]
fn cached_decoding_matches_full_forward_with_prefix_and_prompt() -> Result<()> {
    let (m, base, arch) = setup(DType::F32)?;
    let ids = token_ids(1, 6, 32, 4)?;
    for cfg in all_configs() {
        let a = perturbed(&cfg.init(&arch, &base, 6)?, 300)?;
        let d = a.attach(&arch, &base)?;
        let full = m.forward(&base, &d, &a.params, &ids, None)?;
        assert_eq!(
            full.dims(),
            &[1, 6, 32],
            "{}: one output per real token",
            cfg.method()
        );
        let mut cache = KvCache::new(m.cfg.num_hidden_layers);
        let first = m.forward_last(&base, &d, &a.params, &ids.narrow(1, 0, 4)?, &mut cache)?;
        let fifth = m.forward_last(&base, &d, &a.params, &ids.narrow(1, 4, 1)?, &mut cache)?;
        for (got, pos) in [(first, 3), (fifth, 4)] {
            let want = full.narrow(1, pos, 1)?.squeeze(1)?;
            let diff = max_diff(&got, &want)?;
            assert!(diff < 1e-5, "{} at {pos}: {diff}", cfg.method());
        }
    }
    Ok(())
}

#[test]
fn lora_init_variants_and_patterns() -> Result<()> {
    let (_m, base, arch) = setup(DType::F32)?;
    let mut c = LoraConfig::new(4, 8.0, &["q_proj", "o_proj"]);
    c.rank_pattern.insert("o_proj".into(), 2);
    let a = DeltaConfig::Lora(c.clone()).init(&arch, &base, 1)?;
    assert_eq!(
        a.params
            .get("model.layers.0.self_attn.o_proj.lora_A.weight")?
            .dims(),
        &[2, 16]
    );
    assert_eq!(
        a.params
            .get("model.layers.1.self_attn.q_proj.lora_B.weight")?
            .dims(),
        &[16, 4]
    );
    let b = a
        .params
        .get("model.layers.1.self_attn.q_proj.lora_B.weight")?;
    assert_eq!(
        b.abs()?.max_all()?.to_scalar::<f32>()?,
        0.0,
        "B starts at zero"
    );
    let a_bound = a
        .params
        .get("model.layers.1.self_attn.q_proj.lora_A.weight")?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    assert!(
        a_bound <= 0.25 && a_bound > 0.1,
        "kaiming-uniform(a=sqrt 5) bound 1/sqrt(16): {a_bound}"
    );
    c.init_lora_weights = LoraInit::Default(false);
    let a = DeltaConfig::Lora(c).init(&arch, &base, 1)?;
    let b = a
        .params
        .get("model.layers.1.self_attn.q_proj.lora_B.weight")?;
    assert!(b.abs()?.max_all()?.to_scalar::<f32>()? > 0.0);
    Ok(())
}

#[test]
fn adapters_for_another_model_are_rejected_whole() -> Result<()> {
    let (_m, base, arch) = setup(DType::F32)?;
    let a = DeltaConfig::Lora(LoraConfig::new(2, 4.0, &["q_proj"])).init(&arch, &base, 1)?;
    // Wrong shape.
    let mut p = a.params.clone();
    p.insert_frozen(
        "model.layers.0.self_attn.q_proj.lora_B.weight",
        Tensor::zeros((8, 2), DType::F32, &Device::Cpu)?,
    );
    let err = a.config.build(&arch, &base, &p).unwrap_err().to_string();
    assert!(
        err.contains("q_proj.lora_B.weight") && err.contains("[8, 2]"),
        "{err}"
    );
    // A module the base does not have.
    let mut p = a.params.clone();
    p.insert_frozen(
        "model.layers.7.self_attn.q_proj.lora_A.weight",
        Tensor::zeros((2, 16), DType::F32, &Device::Cpu)?,
    );
    let err = a.config.build(&arch, &base, &p).unwrap_err().to_string();
    assert!(
        err.contains("layers.7") && err.contains("matches no module"),
        "{err}"
    );
    // Targets missing from the base.
    let err = DeltaConfig::Lora(LoraConfig::new(2, 4.0, &["c_attn"]))
        .init(&arch, &base, 1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("c_attn"), "{err}");
    Ok(())
}

#[test]
fn every_method_trains_on_a_bf16_frozen_base() -> Result<()> {
    // A bf16 base must give what the f32 model with the same rounded weights gives: logits and
    // delta gradients, for every method (the frozen matmuls widen bf16 weights internally).
    let (m, base32, arch) = setup(DType::F32)?;
    let half = base32.frozen_matrices_to(DType::BF16)?;
    let rounded = half.to_dtype(DType::F32)?;
    let ids = token_ids(2, 5, 32, 7)?;
    for cfg in all_configs() {
        let a = perturbed(&cfg.init(&arch, &rounded, 5)?, 200)?;
        let d_half = a.attach(&arch, &half)?;
        let d_ref = a.attach(&arch, &rounded)?;
        let y = logits(&m, &half, &d_half, &a.params, &ids)?;
        let want = logits(&m, &rounded, &d_ref, &a.params, &ids)?;
        let diff = max_diff(&y, &want)?;
        assert!(
            diff < 1e-4,
            "{}: bf16 base logits differ by {diff}",
            cfg.method()
        );
        let g = y.sqr()?.mean_all()?.backward()?;
        let gw = want.sqr()?.mean_all()?.backward()?;
        for (name, v) in a.params.vars() {
            let (x, r) = (g.get(v.as_tensor()), gw.get(v.as_tensor()));
            let (Some(x), Some(r)) = (x, r) else {
                assert!(x.is_none() && r.is_none(), "{}: {name}", cfg.method());
                continue;
            };
            let scale = r.abs()?.max_all()?.to_scalar::<f32>()? as f64 + 1e-6;
            let e = max_diff(x, r)? / scale;
            assert!(e < 1e-3, "{}: gradient of {name} off by {e}", cfg.method());
        }
    }
    Ok(())
}

#[test]
fn lora_trains_on_a_quantized_base_like_on_its_dequantized_weights() -> Result<()> {
    use candle_core::quantized::GgmlDType;
    // Rows of 32 or 64 values: whole Q8_0 / Q4_1 blocks.
    let mut cfg = crate::model::testing::tiny_llama_config();
    cfg.hidden_size = 32;
    cfg.intermediate_size = 64;
    cfg.head_dim = 8;
    let m = Llama::new(cfg.clone(), &Device::Cpu)?;
    let dense = crate::model::testing::random_params(&Llama::expected_params(&cfg), 5, DType::F32)?;
    let arch = Arch::Llama(cfg);
    let ids = token_ids(2, 6, 32, 9)?;
    for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_1] {
        let q = dense.quantize_matrices(dtype)?;
        assert!(q.quantized("model.layers.0.mlp.down_proj.weight").is_some());
        assert!(q.quantized("model.embed_tokens.weight").is_some());
        let reference = q.dequantized()?;
        let cfg = DeltaConfig::Lora(LoraConfig::new(
            2,
            4.0,
            &[
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ],
        ));
        let a = perturbed(&cfg.init(&arch, &reference, 1)?, 300)?;
        let (dq, dr) = (a.attach(&arch, &q)?, a.attach(&arch, &reference)?);
        let y = logits(&m, &q, &dq, &a.params, &ids)?;
        let want = logits(&m, &reference, &dr, &a.params, &ids)?;
        let diff = max_diff(&y, &want)?;
        assert!(diff < 1e-4, "{dtype:?}: logits differ by {diff}");
        let g = y.sqr()?.mean_all()?.backward()?;
        let gw = want.sqr()?.mean_all()?.backward()?;
        for (name, v) in a.params.vars() {
            let (x, r) = (
                g.get(v.as_tensor()).unwrap(),
                gw.get(v.as_tensor()).unwrap(),
            );
            let scale = r.abs()?.max_all()?.to_scalar::<f32>()? as f64;
            let e = max_diff(x, r)? / scale;
            assert!(e < 1e-3, "{dtype:?}: gradient of {name} off by {e}");
        }
        // A delta that reads the dense base weight says why it cannot.
        let tarp_mul = tarp(TarpVariant::Bilinear, true);
        let t = tarp_mul.init(&arch, &reference, 2)?;
        let err = logits(&m, &q, &t.attach(&arch, &q)?, &t.params, &ids)
            .unwrap_err()
            .to_string();
        assert!(err.contains("stored quantized"), "{err}");
        let tarp_add = tarp(TarpVariant::Bilinear, false);
        let t = perturbed(&tarp_add.init(&arch, &reference, 2)?, 400)?;
        let y = logits(&m, &q, &t.attach(&arch, &q)?, &t.params, &ids)?;
        let want = logits(
            &m,
            &reference,
            &t.attach(&arch, &reference)?,
            &t.params,
            &ids,
        )?;
        assert!(max_diff(&y, &want)? < 1e-4);
    }
    Ok(())
}
