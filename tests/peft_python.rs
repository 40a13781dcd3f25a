//! Adapters written by Hugging Face PEFT 0.21.2 (fixtures from `scripts/reference/peft_fixtures.py`)
//! loaded into SmolLM2-135M reproduce PEFT's logits and greedy tokens, and our own PEFT export of
//! them is byte-for-byte the same function.

mod common;

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use metapeft::generate::{generate, GenerateOptions};
use metapeft::io::{self, AdapterFormat};
use metapeft::model::{Arch, KvCache, Llama};
use metapeft::params::ParamStore;
use metapeft::peft::{Adapter, DeltaSet};

const ADAPTERS: [&str; 6] = [
    "lora_qv_down",
    "lora_rslora_patterns",
    "lora_layers_list",
    "ia3",
    "prompt_tuning",
    "prefix_tuning",
];

fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/peft")
        .join(name)
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn llama() -> Llama {
    let Arch::Llama(c) = &common::smollm2().arch else {
        panic!()
    };
    Llama::new(c.clone(), &Device::Cpu).unwrap()
}

fn last_logits(m: &Llama, d: &DeltaSet, dp: &ParamStore, prompt: &[u32]) -> Vec<f32> {
    let ck = common::smollm2();
    let t = Tensor::new(prompt, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let mut cache = KvCache::new(m.cfg.num_hidden_layers);
    m.forward_last(&ck.params, d, dp, &t, &mut cache)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Compare against one fixture entry: logits head and top-5 at the last prompt position, then
/// greedy tokens until the first step PEFT itself saw as a near-tie.
fn check_cases(name: &str, entry: &serde_json::Value, a: &Adapter) {
    let ck = common::smollm2();
    let m = llama();
    let d = a.attach(&ck.arch, &ck.params).unwrap();
    for case in entry["cases"].as_array().unwrap() {
        let prompt = ids(&case["prompt_ids"]);
        let got = last_logits(&m, &d, &a.params, &prompt);
        for (j, (x, y)) in got
            .iter()
            .zip(floats(&case["last_logits_head"]))
            .enumerate()
        {
            assert!(
                (x - y).abs() < 2e-3,
                "{name} {:?}: logit {j}: {x} vs PEFT {y}",
                case["prompt"]
            );
        }
        for (id, want) in ids(&case["last_top5_ids"])
            .iter()
            .zip(floats(&case["last_top5_logits"]))
        {
            let x = got[*id as usize];
            assert!(
                (x - want).abs() < 2e-3,
                "{name} {:?}: top-5 id {id}: {x} vs PEFT {want}",
                case["prompt"]
            );
        }
        let want = ids(&case["generated_ids"]);
        let opts = GenerateOptions {
            max_new_tokens: want.len(),
            stop_at_eos: false,
            ..Default::default()
        };
        let g = generate(
            &m,
            &ck.params,
            &d,
            &a.params,
            &ck.tokenizer,
            &prompt,
            &opts,
            |_| {},
        )
        .unwrap();
        for (i, (x, y)) in g.generated_ids.iter().zip(&want).enumerate() {
            if x != y {
                let lp = floats(&case["steps"][i]["top2_logprobs"]);
                let gap = (lp[0] - lp[1]).abs();
                assert!(
                    gap < 1e-3,
                    "{name} {:?}: token {i} is {x}, PEFT chose {y} (top-2 gap {gap})",
                    case["prompt"]
                );
                break;
            }
        }
    }
}

#[test]
fn peft_written_adapters_reproduce_peft_outputs() {
    let fx = common::fixture("peft/expected.json");
    let ck = common::smollm2();
    for name in ADAPTERS {
        let a = io::load_adapter(&fixture_dir(name), &ck.arch, &ck.params)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        check_cases(name, &fx["adapters"][name], &a);
    }
}

#[test]
fn adapters_change_the_base_output() {
    let fx = common::fixture("peft/expected.json");
    let m = llama();
    let base = last_logits(
        &m,
        &DeltaSet::none(),
        &ParamStore::new(),
        &ids(&fx["base"]["cases"][0]["prompt_ids"]),
    );
    for (j, (x, y)) in base
        .iter()
        .zip(floats(&fx["base"]["cases"][0]["last_logits_head"]))
        .enumerate()
    {
        assert!((x - y).abs() < 2e-3, "base logit {j}: {x} vs {y}");
    }
    for name in ADAPTERS {
        let moved = fx["adapters"][name]["max_abs_diff_vs_base_last_logits_head"]
            .as_f64()
            .unwrap();
        assert!(
            moved > 0.05,
            "{name} fixture barely changes the base ({moved})"
        );
    }
}

/// Re-saving a PEFT-written adapter with metapeft gives the same tensors under the same names and
/// a config PEFT reads back to the same adapter.
#[test]
fn peft_round_trip_through_metapeft() {
    let ck = common::smollm2();
    for name in [
        "lora_rslora_patterns",
        "ia3",
        "prompt_tuning",
        "prefix_tuning",
    ] {
        let a = io::load_adapter(&fixture_dir(name), &ck.arch, &ck.params).unwrap();
        let out = common::temp_dir(&format!("peft-rt-{name}"));
        io::save_adapter(
            &a,
            &ck.arch,
            "SmolLM2-135M-Instruct",
            &out,
            AdapterFormat::Peft,
        )
        .unwrap();
        let theirs =
            io::load_safetensors(&fixture_dir(name).join("adapter_model.safetensors")).unwrap();
        let ours = io::load_safetensors(&out.join("adapter_model.safetensors")).unwrap();
        assert_eq!(theirs.len(), ours.len(), "{name}");
        for ((n1, t1), (n2, t2)) in theirs.iter().zip(&ours) {
            assert_eq!(n1, n2, "{name}");
            let d = (t1 - t2)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(d, 0.0, "{name}: {n1}");
        }
        let b = io::load_adapter(&out, &ck.arch, &ck.params).unwrap();
        assert_eq!(a.config, b.config, "{name}");
    }
}
