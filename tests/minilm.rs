//! all-MiniLM-L6-v2 (safetensors): sentence embeddings against known values and transformers.

mod common;

use candle_core::{Device, Tensor};
use metapeft::model::bert::cosine;
use metapeft::model::{Arch, Bert};
use metapeft::params::ParamStore;
use metapeft::peft::lora::{Lora, LoraConfig};
use metapeft::peft::DeltaSet;

fn bert() -> Bert {
    let Arch::Bert(cfg) = &common::minilm().arch else {
        panic!("not an encoder")
    };
    Bert::new(cfg.clone())
}

fn embed(texts: &[&str]) -> Vec<Vec<f32>> {
    let ck = common::minilm();
    let texts: Vec<String> = texts.iter().map(|s| s.to_string()).collect();
    bert()
        .embed_texts(&ck.params, &ck.tokenizer, &texts)
        .unwrap()
}

#[test]
fn known_cosine_similarities() {
    let e = embed(&[
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The stock market crashed today.",
    ]);
    let c1 = cosine(&e[0], &e[1]);
    let c2 = cosine(&e[0], &e[2]);
    assert!((c1 - 0.7553).abs() < 5e-4, "{c1}");
    assert!((c2 - 0.0088).abs() < 5e-4, "{c2}");
    for v in &e {
        let n: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((n - 1.0).abs() < 1e-5);
    }
}

/// Embeddings equal transformers' (mean pooling + L2) to 1e-4 and token ids match, also when a
/// batch mixes lengths (padding must not change a sentence's embedding).
#[test]
fn embeddings_match_transformers() {
    let fx = common::fixture("minilm_embeddings.json");
    let ck = common::minilm();
    let cases = fx["cases"].as_array().unwrap();
    let texts: Vec<&str> = cases.iter().map(|c| c["text"].as_str().unwrap()).collect();
    let e = embed(&texts);
    for (c, v) in cases.iter().zip(&e) {
        let text = c["text"].as_str().unwrap();
        let want_ids: Vec<u32> = c["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(
            ck.tokenizer.encode(text, true).unwrap(),
            want_ids,
            "ids of {text:?}"
        );
        let head: Vec<f32> = c["embedding_head"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        for (j, (a, b)) in v.iter().zip(&head).enumerate() {
            assert!((a - b).abs() < 1e-4, "{text:?} dim {j}: {a} vs {b}");
        }
    }
}

#[test]
fn every_lora_tensor_gets_a_gradient() {
    let ck = common::minilm();
    let m = bert();
    let cfg = LoraConfig {
        init_lora_weights: metapeft::peft::lora::LoraInit::Default(false),
        ..LoraConfig::new(
            4,
            8.0,
            &[
                "query",
                "key",
                "value",
                "attention.output.dense",
                "intermediate.dense",
                "output.dense",
            ],
        )
    };
    let (lora, lp) = Lora::init(&cfg, &ck.params, 0).unwrap();
    assert_eq!(lora.num_modules(), 6 * 6);
    let mut deltas = DeltaSet::none();
    deltas.push(lora);
    let ids = Tensor::new(
        &[
            [101u32, 1037, 2158, 2003, 5983, 2833, 1012, 102],
            [101, 1996, 4518, 3006, 102, 0, 0, 0],
        ],
        &Device::Cpu,
    )
    .unwrap();
    let mask = Tensor::new(&[[1u32; 8], [1, 1, 1, 1, 1, 0, 0, 0]], &Device::Cpu).unwrap();
    let e = m.embed(&ck.params, &deltas, &lp, &ids, &mask).unwrap();
    // A similarity objective: pull the two sentences together.
    let loss = (e.narrow(0, 0, 1).unwrap() * e.narrow(0, 1, 1).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .neg()
        .unwrap();
    let grads = loss.backward().unwrap();
    common::assert_every_var_has_gradient(&grads, &lp.vars());
    let _ = ParamStore::new();
}
