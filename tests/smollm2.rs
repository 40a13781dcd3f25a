//! SmolLM2-135M-Instruct (GGUF, Q4_1): known answers, parity with Hugging Face transformers on the
//! same dequantized weights, GGUF vs Hugging Face directory, tokenizer, gradients, generation.

mod common;

use candle_core::{DType, Device, Tensor};
use metapeft::generate::{generate, GenerateOptions};
use metapeft::model::{self, Arch, ChatMessage, Llama};
use metapeft::params::ParamStore;
use metapeft::peft::lora::{Lora, LoraConfig};
use metapeft::peft::DeltaSet;

/// A short real sentence as `[1, n]` token ids, and `n`.
fn fox_ids(ck: &model::Checkpoint) -> (Tensor, usize) {
    let ids = ck
        .tokenizer
        .encode("The quick brown fox jumps over the lazy dog", false)
        .unwrap();
    let n = ids.len();
    let t = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    (t, n)
}

fn llama(ck: &model::Checkpoint) -> Llama {
    let Arch::Llama(cfg) = &ck.arch else {
        panic!("not a decoder")
    };
    Llama::new(cfg.clone(), &Device::Cpu).unwrap()
}

fn greedy(
    ck: &model::Checkpoint,
    ids: &[u32],
    n: usize,
    stop_at_eos: bool,
) -> metapeft::generate::Generation {
    let opts = GenerateOptions {
        max_new_tokens: n,
        logprobs: 2,
        stop_at_eos,
        ..Default::default()
    };
    generate(
        &llama(ck),
        &ck.params,
        &DeltaSet::none(),
        &ParamStore::new(),
        &ck.tokenizer,
        ids,
        &opts,
        |_| {},
    )
    .unwrap()
}

#[test]
fn chat_answer_capital_of_france() {
    let ck = common::smollm2();
    let prompt = ck
        .tokenizer
        .render_chat(&[ChatMessage::user("What is the capital of France?")], true)
        .unwrap();
    let ids = ck.tokenizer.encode(&prompt, true).unwrap();
    let g = greedy(ck, &ids, 32, true);
    assert_eq!(g.text, "The capital of France is Paris.");
    assert_eq!(g.finish_reason, "eos");
}

#[test]
fn chat_template_matches_transformers_rendering() {
    let fx = common::fixture("smollm2_greedy.json");
    let ck = common::smollm2();
    let prompt = ck
        .tokenizer
        .render_chat(&[ChatMessage::user("What is the capital of France?")], true)
        .unwrap();
    assert_eq!(prompt, fx["cases"][0]["prompt"].as_str().unwrap());
}

/// Greedy tokens equal transformers' on the same dequantized weights, except after a step where
/// transformers' top-2 log-probabilities are within 1e-4 (a near-tie either side may break).
#[test]
fn greedy_matches_transformers() {
    let fx = common::fixture("smollm2_greedy.json");
    let ck = common::smollm2();
    let m = llama(ck);
    for case in fx["cases"].as_array().unwrap() {
        let prompt_ids: Vec<u32> = case["prompt_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let want: Vec<u32> = case["generated_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let g = greedy(ck, &prompt_ids, want.len(), false);
        for (i, (a, b)) in g.generated_ids.iter().zip(&want).enumerate() {
            if a != b {
                let lp = &case["steps"][i]["top2_logprobs"];
                let gap = (lp[0].as_f64().unwrap() - lp[1].as_f64().unwrap()).abs();
                assert!(
                    gap < 1e-4,
                    "prompt {:?}: token {i} is {a}, transformers chose {b} (top-2 gap {gap})",
                    case["prompt"]
                );
                break;
            }
        }
        // Raw logits at the last prompt position agree closely too.
        let head: Vec<f32> = case["last_logits_head"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let ids = Tensor::new(prompt_ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let mut cache = model::KvCache::new(m.cfg.num_hidden_layers);
        let logits = m
            .forward_last(
                &ck.params,
                &DeltaSet::none(),
                &ParamStore::new(),
                &ids,
                &mut cache,
            )
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (j, (a, b)) in logits.iter().zip(&head).enumerate() {
            assert!(
                (a - b).abs() < 2e-3,
                "prompt {:?}: logit {j}: {a} vs transformers {b}",
                case["prompt"]
            );
        }
    }
}

/// Token ids equal the original SmolLM2 tokenizer's pre-tokenization (digits split one by one, as
/// llama.cpp's `smollm` pre-tokenizer does), and decoding round-trips.
#[test]
fn tokenizer_matches_reference() {
    let fx = common::fixture("smollm2_tokenizer.json");
    let ck = common::smollm2();
    for case in fx["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids_llamacpp_pretok"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = ck.tokenizer.encode(text, false).unwrap();
        assert_eq!(got, want, "text {text:?}");
        assert_eq!(
            ck.tokenizer.decode(&got, false).unwrap(),
            text,
            "decode of {text:?}"
        );
    }
}

/// The same weights loaded from the GGUF and from a Hugging Face directory written from it give
/// the same logits (1e-4) and the same tokenization.
#[test]
fn gguf_and_hf_directory_agree() {
    let ck = common::smollm2();
    let dir = common::temp_dir("hfdir");
    metapeft::io::hf_dir::write_hf_dir(ck, &dir).unwrap();
    let hf = model::load(&dir.to_string_lossy(), &Device::Cpu).unwrap();
    let text = "Rust is a systems programming language 2024 <|im_start|>user";
    let ids_a = ck.tokenizer.encode(text, true).unwrap();
    let ids_b = hf.tokenizer.encode(text, true).unwrap();
    assert_eq!(ids_a, ids_b);
    let ids = Tensor::new(ids_a.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let la = llama(ck)
        .forward(
            &ck.params,
            &DeltaSet::none(),
            &ParamStore::new(),
            &ids,
            None,
        )
        .unwrap();
    let lb = llama(&hf)
        .forward(
            &hf.params,
            &DeltaSet::none(),
            &ParamStore::new(),
            &ids,
            None,
        )
        .unwrap();
    let d = (la - lb)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d < 1e-4, "max logit difference {d}");
    assert_eq!(hf.tokenizer.chat_template, ck.tokenizer.chat_template);
    assert_eq!(hf.tokenizer.eos_ids, ck.tokenizer.eos_ids);
    // Both stores list their tensors in the same canonical order, so seeded initialisation of a
    // delta gives the same numbers whichever file the base came from.
    let na: Vec<&str> = ck.params.names().collect();
    let nb: Vec<&str> = hf.params.names().collect();
    assert_eq!(na, nb);
    assert_eq!(na[0], "model.embed_tokens.weight");
    assert_eq!(na[1], "model.layers.0.input_layernorm.weight");
    let _ = std::fs::remove_dir_all(&dir);
}

/// One backward through the real model with LoRA on every linear of every layer: every trainable
/// tensor gets a finite, non-zero gradient (candle's fused ops would silently drop some).
#[test]
fn every_lora_tensor_gets_a_gradient() {
    let ck = common::smollm2();
    let m = llama(ck);
    let cfg = LoraConfig {
        init_lora_weights: metapeft::peft::lora::LoraInit::Default(false),
        ..LoraConfig::new(
            4,
            8.0,
            &[
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ],
        )
    };
    let (lora, lp) = Lora::init(&cfg, &ck.params, 0).unwrap();
    assert_eq!(lora.num_modules(), 7 * m.cfg.num_hidden_layers);
    let mut deltas = DeltaSet::none();
    deltas.push(lora);
    let (ids, n) = fox_ids(ck);
    let logits = m.forward(&ck.params, &deltas, &lp, &ids, None).unwrap();
    let loss = metapeft::ops::cross_entropy(
        &logits.narrow(1, 0, n - 1).unwrap(),
        &ids.narrow(1, 1, n - 1).unwrap(),
        -100,
    )
    .unwrap();
    let grads = loss.backward().unwrap();
    let vars = lp.vars();
    assert_eq!(vars.len(), 2 * 7 * 30);
    common::assert_every_var_has_gradient(&grads, &vars);
    // The frozen base gets no gradient at all.
    assert!(grads
        .get(
            ck.params
                .get("model.layers.0.self_attn.q_proj.weight")
                .unwrap()
        )
        .is_none());
}

#[test]
fn stop_strings_logprobs_and_seeded_sampling() {
    let ck = common::smollm2();
    let m = llama(ck);
    let ids = ck
        .tokenizer
        .encode("Here is a shopping list:\n1. Apples\n2. Bread\n3.", false)
        .unwrap();
    let run = |opts: &GenerateOptions| {
        generate(
            &m,
            &ck.params,
            &DeltaSet::none(),
            &ParamStore::new(),
            &ck.tokenizer,
            &ids,
            opts,
            |_| {},
        )
        .unwrap()
    };
    let stopped = run(&GenerateOptions {
        max_new_tokens: 40,
        stop: vec!["\n".into()],
        ..Default::default()
    });
    assert_eq!(stopped.finish_reason, "stop");
    assert!(!stopped.text.contains('\n'), "{:?}", stopped.text);

    let lp = run(&GenerateOptions {
        max_new_tokens: 5,
        logprobs: 3,
        ..Default::default()
    });
    assert_eq!(lp.steps.len(), 5);
    for (s, id) in lp.steps.iter().zip(&lp.generated_ids) {
        assert_eq!(s.ids.len(), 3);
        assert_eq!(s.ids[0], *id, "greedy picks the most likely token");
        assert!(
            s.logprobs[0] <= 0.0
                && s.logprobs[0] >= s.logprobs[1]
                && s.logprobs[1] >= s.logprobs[2]
        );
    }

    let sample = |seed| {
        run(&GenerateOptions {
            max_new_tokens: 12,
            temperature: 1.0,
            top_p: Some(0.9),
            top_k: Some(50),
            seed,
            stop_at_eos: false,
            ..Default::default()
        })
        .generated_ids
    };
    assert_eq!(sample(3), sample(3));
    assert_ne!(sample(3), sample(4));
}

#[test]
fn bf16_storage_gives_nearly_the_same_logits() {
    let ck = common::smollm2();
    let m = llama(ck);
    let bf = ck.params.to_dtype(DType::BF16).unwrap();
    let ids = Tensor::new(&[504u32, 3575, 282, 4649], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let a = m
        .forward(
            &ck.params,
            &DeltaSet::none(),
            &ParamStore::new(),
            &ids,
            None,
        )
        .unwrap();
    let b = m
        .forward(&bf, &DeltaSet::none(), &ParamStore::new(), &ids, None)
        .unwrap();
    let top = |t: &Tensor| {
        t.narrow(1, 3, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .argmax(0)
            .unwrap()
            .to_scalar::<u32>()
            .unwrap()
    };
    assert_eq!(top(&a), top(&b));
}

#[test]
fn quantized_gguf_base_trains_like_its_dequantized_weights() {
    // The GGUF's own blocks (Q4_1 linears, Q8_0 embedding) kept quantized: the same logits and
    // LoRA gradients as the f32 model dequantized from the same file (the issue asks < 1e-2).
    let dense = common::smollm2();
    let q = model::load_quantized(common::smollm2_path().to_str().unwrap(), &Device::Cpu).unwrap();
    let kept: usize = q
        .params
        .quantized_entries()
        .map(|(_, w)| w.size_in_bytes())
        .sum();
    let file = std::fs::metadata(common::smollm2_path()).unwrap().len() as usize;
    assert!(
        q.params.quantized_entries().count() >= 7 * 30 && kept < file,
        "{kept} bytes kept quantized, file {file}"
    );
    let m = llama(dense);
    let cfg = LoraConfig {
        init_lora_weights: metapeft::peft::lora::LoraInit::Default(false),
        ..LoraConfig::new(4, 8.0, &["q_proj", "v_proj", "down_proj"])
    };
    let (ids, n) = fox_ids(dense);
    let (lora, lp) = Lora::init(&cfg, &dense.params, 0).unwrap();
    let mut deltas = DeltaSet::none();
    deltas.push(lora);
    let run = |p: &ParamStore| {
        let logits = m.forward(p, &deltas, &lp, &ids, None).unwrap();
        let loss = metapeft::ops::cross_entropy(
            &logits.narrow(1, 0, n - 1).unwrap(),
            &ids.narrow(1, 1, n - 1).unwrap(),
            -100,
        )
        .unwrap();
        (logits, loss.backward().unwrap())
    };
    let (la, ga) = run(&dense.params);
    let (lb, gb) = run(&q.params);
    let diff = (&la - &lb).unwrap().abs().unwrap().max_all().unwrap();
    assert!(
        diff.to_scalar::<f32>().unwrap() < 1e-3,
        "logits differ by {diff}"
    );
    for (name, v) in lp.vars() {
        let (a, b) = (
            ga.get(v.as_tensor()).unwrap(),
            gb.get(v.as_tensor()).unwrap(),
        );
        let rel = common::l2(&(a - b).unwrap()) / common::l2(a);
        assert!(rel < 1e-2, "gradient of {name}: relative error {rel}");
    }
}
