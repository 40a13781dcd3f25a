//! Inference from GGUF's quantized blocks against the dequantized f32 model.
mod common;

use candle_core::{Device, Tensor};
use metapeft::model::BaseStorage;
use metapeft::model::{self, Arch, KvCache, Llama};
use metapeft::params::ParamStore;
use metapeft::peft::DeltaSet;

/// Teacher-forced greedy decoding: at each step both models see the f32 model's tokens; their
/// argmaxes must agree unless the f32 model's top two logits are within `tie` of each other.
fn greedy_agrees(storage: &str, tie: f32) {
    let f32ck = common::smollm2();
    let path = common::smollm2_path();
    let qck = BaseStorage::parse(storage)
        .unwrap()
        .load(&path.to_string_lossy())
        .expect("load quantized");
    let Arch::Llama(cfg) = &f32ck.arch else {
        panic!("decoder expected")
    };
    let m = Llama::new(cfg.clone(), &Device::Cpu).unwrap();
    let prompt =
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
    let ids = f32ck.tokenizer.encode(prompt, false).unwrap();
    let (e, d) = (ParamStore::new(), DeltaSet::none());
    let (mut cf, mut cq) = (
        KvCache::new(cfg.num_hidden_layers),
        KvCache::new(cfg.num_hidden_layers),
    );
    let mut input = ids.clone();
    let mut near_ties = 0;
    for step in 0..24 {
        let t = Tensor::from_vec(input.clone(), (1, input.len()), &Device::Cpu).unwrap();
        let lf = m.forward_last(&f32ck.params, &d, &e, &t, &mut cf).unwrap();
        // As generation runs it: integer kernels for the 8-bit-activation decode steps.
        let lq = metapeft::ops::with_integer_kernels(|| {
            m.forward_last(&qck.params, &d, &e, &t, &mut cq)
        })
        .unwrap();
        let lf = lf.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let lq = lq.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (af, aq) = (
            metapeft::generate::argmax(&lf) as usize,
            metapeft::generate::argmax(&lq) as usize,
        );
        if af != aq {
            let gap = lf[af] - lf[aq];
            assert!(
                gap < tie,
                "step {step}: f32 picks {af}, quantized {aq}, f32 logit gap {gap} (not a near-tie)"
            );
            near_ties += 1;
        }
        input = vec![af as u32];
    }
    assert!(near_ties <= 2, "{near_ties} near-ties in 24 steps");
}

#[test]
fn gguf_blocks_give_the_f32_models_greedy_tokens() {
    // The file's Q4_1 blocks (and Q8_0 embedding) are exactly the f32 model's weights; only the
    // 8-bit rounding of activations differs.
    greedy_agrees("gguf", 0.5);
}

#[test]
fn requantized_q8_0_gives_the_f32_models_greedy_tokens() {
    greedy_agrees("q8_0", 0.5);
}

#[test]
fn unknown_weight_format_and_adapters_on_quantized_weights_are_clear_errors() {
    let (code, _, err) = common::metapeft(&["generate", "--prompt", "hi", "--weights", "q4_k"]);
    assert_ne!(code, 0);
    assert!(err.contains("unknown weight storage `q4_k`"), "{err}");
    let qck =
        model::load_quantized(&common::smollm2_path().to_string_lossy(), &Device::Cpu).unwrap();
    let err = qck
        .params
        .get("model.layers.0.self_attn.q_proj.weight")
        .unwrap_err();
    assert!(err.to_string().contains("stored quantized"), "{err}");
}

/// `generate --chat`'s answer to the capital of France from weights stored as `weights`.
fn capital_answer(weights: &str, tokens: usize) -> String {
    let (code, out, err) = common::metapeft(&[
        "generate",
        "--chat",
        "--prompt",
        "What is the capital of France?",
        "--weights",
        weights,
        "--max-new-tokens",
        &tokens.to_string(),
    ]);
    assert_eq!(code, 0, "{err}");
    out
}

#[test]
fn generate_answers_from_quantized_weights() {
    // End to end through `generate` (prompt pass, then integer-kernel decode steps): this caught
    // the LM head bug that the teacher-forced comparison above did not.
    for w in ["gguf", "q8_0"] {
        let out = capital_answer(w, 12);
        assert!(out.contains("Paris"), "--weights {w}: {out}");
    }
}

/// The inference layout (`--weights packed`) holds the f32 weights: the same logits up to
/// summation order over a prompt and teacher-forced steps (prompt pass on the panel kernel,
/// steps on the tensor path), and `generate` prints the same text from both.
#[test]
fn packed_weights_give_the_f32_models_logits_and_text() {
    let f32ck = common::smollm2();
    let packed = BaseStorage::Packed
        .load(&common::smollm2_path().to_string_lossy())
        .expect("load packed");
    assert!(packed
        .params
        .quantized("model.embed_tokens.weight")
        .is_some());
    let Arch::Llama(cfg) = &f32ck.arch else {
        panic!("decoder expected")
    };
    let m = Llama::new(cfg.clone(), &Device::Cpu).unwrap();
    let ids = f32ck
        .tokenizer
        .encode("The history of the Roman empire", false)
        .unwrap();
    let (e, d) = (ParamStore::new(), DeltaSet::none());
    let (mut cf, mut cp) = (
        KvCache::new(cfg.num_hidden_layers),
        KvCache::new(cfg.num_hidden_layers),
    );
    let mut input = ids;
    for step in 0..8 {
        let t = Tensor::from_vec(input.clone(), (1, input.len()), &Device::Cpu).unwrap();
        let lf = m.forward_last(&f32ck.params, &d, &e, &t, &mut cf).unwrap();
        let lp = m.forward_last(&packed.params, &d, &e, &t, &mut cp).unwrap();
        let lf = lf.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let lp = lp.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let scale = lf.iter().fold(0f32, |a, v| a.max(v.abs()));
        let diff = lf
            .iter()
            .zip(&lp)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            diff <= 1e-4 * scale,
            "step {step}: max |diff| {diff}, logits up to {scale}"
        );
        input = vec![metapeft::generate::argmax(&lf)];
    }
    let (f, p) = (capital_answer("f32", 24), capital_answer("packed", 24));
    assert!(p.contains("Paris"), "{p}");
    assert_eq!(f, p);
}
