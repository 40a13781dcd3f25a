//! Workloads for `metapeft bench`: each is timed over repeated runs on the real model. Peak memory
//! is measured per workload by running each in its own process (see the CLI).

use std::time::Instant;

use candle_core::{Device, Tensor};

use crate::generate::{generate, GenerateOptions};
use crate::model::{Checkpoint, Llama};
use crate::params::ParamStore;
use crate::peft::lora::{Lora, LoraConfig};
use crate::peft::DeltaSet;
use crate::{Error, Result};

pub const WORKLOADS: [(&str, &str); 34] = [
    (
        "matmul",
        "f32 1024 x 1024 x 1024 matmul: the machine's matmul peak, for the % column",
    ),
    (
        "lora-qv",
        "LoRA r=8 on q,v: train step (fwd+bwd+AdamW), batch 4 x 128",
    ),
    (
        "lora-all",
        "LoRA r=8 on all 7 linears: train step, batch 4 x 128",
    ),
    ("full", "full fine-tuning: train step, batch 4 x 128"),
    ("forward", "forward, 1 x 128"),
    (
        "forward-packed",
        "forward, 1 x 128, from the inference layout (`--weights packed`: f32 in panels)",
    ),
    (
        "generate",
        "greedy generation, 32-token prompt + 64 new tokens",
    ),
    (
        "minilm-lora",
        "all-MiniLM-L6-v2 + LoRA r=8 (query, value) classifier step, 16 x 64 (always MiniLM)",
    ),
    (
        "startup",
        "load + dequantize the checkpoint, tokenizer, model, fresh LoRA: all before the first step",
    ),
    (
        "lora-qv-bf16",
        "lora-qv with the frozen base stored in bf16 (weights widened to f32 per product)",
    ),
    (
        "lora-qv-gguf",
        "lora-qv on the GGUF's own quantized blocks (Q4_1 linears, Q8_0 embedding): QLoRA-style",
    ),
    (
        "lora-qv-q8_0",
        "lora-qv on the base requantized to Q8_0",
    ),
    (
        "lora-qv-ckpt",
        "lora-qv with activation checkpointing (each layer re-run in the backward pass)",
    ),
    (
        "lora-all-ckpt",
        "lora-all with activation checkpointing",
    ),
    (
        "lora-qv-gguf-ckpt",
        "lora-qv-gguf with activation checkpointing: the least memory",
    ),
    (
        "fomaml-ckpt",
        "fomaml with activation checkpointing",
    ),
    (
        "minilm-lora-ckpt",
        "minilm-lora with activation checkpointing",
    ),
    (
        "full-ckpt",
        "full with activation checkpointing",
    ),
    (
        "generate-q8_0",
        "greedy generation from Q8_0 weights, 32-token prompt + 64 new tokens",
    ),
    (
        "generate-q4_1",
        "greedy generation from Q4_1 weights, 32-token prompt + 64 new tokens",
    ),
    (
        "decode",
        "decode only: 64 greedy tokens after a 32-token prompt (the prompt is not timed)",
    ),
    ("decode-q8_0", "decode only, from Q8_0 weights"),
    ("decode-q4_1", "decode only, from the GGUF's Q4_1 blocks"),
    ("decode-bf16", "decode only, from a bf16 copy of the weights"),
    ("decode-packed", "decode only, from the inference layout (f32 in panels)"),
    ("prefill", "prefill: 128-token prompt into a KV cache, last logits"),
    ("prefill-q8_0", "prefill from Q8_0 weights, 128-token prompt"),
    ("prefill-q4_1", "prefill from Q4_1 weights, 128-token prompt"),
    ("prefill-packed", "prefill from the inference layout (f32 in panels), 128-token prompt"),
    (
        "tams-forward",
        "forward 4 x 128 with a TAMS cell in every layer, one-hot architecture (unselected ops skipped)",
    ),
    (
        "tams-forward-all",
        "the same with the architecture carrying a graph (every op runs, as under straight-through)",
    ),
    (
        "fomaml",
        "FOMAML episode, LoRA r=8 on q,v: 5 inner SGD steps on 4 x 128 + query step on 4 x 128",
    ),
    (
        "maml-exact",
        "exact second-order MAML episode, LoRA q,v: 1 inner step on 4 x 128 + query 4 x 128",
    ),
    (
        "maml-hf",
        "Hessian-free MAML episode, LoRA q,v: 1 inner step on 4 x 128 + query 4 x 128",
    ),
];

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Timing {
    pub workload: String,
    pub seconds: Vec<f64>,
    /// Model FLOPs of one run (matmuls only), for GFLOP/s.
    pub flops: f64,
    /// For generation: new tokens per run.
    pub tokens: usize,
    pub peak_rss_mib: f64,
}

/// How a workload stores the base: `-q8_0` requantizes to Q8_0, `-q4_1` and `-gguf` keep the
/// GGUF's own blocks (SmolLM2's file is Q4_1 with a Q8_0 embedding, as llama.cpp's Q4_1 run),
/// `-bf16` halves it; everything else is f32.
pub fn storage_of(workload: &str) -> crate::model::BaseStorage {
    use crate::model::BaseStorage as B;
    let workload = workload.strip_suffix("-ckpt").unwrap_or(workload);
    if workload.ends_with("-q8_0") {
        B::Requantized(candle_core::quantized::GgmlDType::Q8_0)
    } else if workload.ends_with("-q4_1") || workload.ends_with("-gguf") {
        B::Gguf
    } else if workload.ends_with("-packed") {
        B::Packed
    } else if workload.ends_with("-bf16") {
        B::Dense(candle_core::DType::BF16)
    } else {
        B::Dense(candle_core::DType::F32)
    }
}

/// `n` token ids from real text (tiny-shakespeare when available), cycled as needed.
pub fn text_tokens(ck: &Checkpoint, n: usize) -> Result<Vec<u32>> {
    let p = crate::assets::data_dir().join("lm/tinyshakespeare/input.txt");
    let text = std::fs::read_to_string(&p)
        .unwrap_or_else(|_| "The quick brown fox jumps over the lazy dog. ".repeat(64));
    let head: String = text.chars().take(n * 8).collect();
    let ids = ck.tokenizer.encode(&head, false)?;
    if ids.is_empty() {
        return Err(Error::invalid("no tokens for the benchmark"));
    }
    Ok(ids.iter().copied().cycle().take(n).collect())
}

fn forward_flops(m: &Llama, tokens: usize, seq: usize) -> f64 {
    let c = &m.cfg;
    let q = c.num_attention_heads * c.head_dim;
    let kv = c.num_key_value_heads * c.head_dim;
    let per_layer = c.hidden_size * (2 * q + 2 * kv) + 3 * c.hidden_size * c.intermediate_size;
    let linear = 2.0
        * (c.num_hidden_layers * per_layer + c.vocab_size * c.hidden_size) as f64
        * tokens as f64;
    let attn = 4.0 * (c.num_hidden_layers * q) as f64 * seq as f64 * tokens as f64;
    linear + attn
}

/// The optimiser of the training workloads: `adapt`'s own (the fused AdamW); the small rate only
/// keeps the weights sane across runs.
struct Adam(crate::train::optim::Optimizer);

impl Adam {
    fn step(&mut self, grads: &candle_core::backprop::GradStore) -> Result<()> {
        self.0.step(grads, 1e-5)
    }
}

fn adamw(vars: Vec<candle_core::Var>) -> Result<Adam> {
    let named = vars
        .into_iter()
        .enumerate()
        .map(|(i, v)| (format!("p{i}"), v))
        .collect();
    Ok(Adam(crate::train::optim::Optimizer::new(
        crate::train::optim::OptimizerConfig::default(),
        named,
    )?))
}

fn lora_cfg(targets: &[&str]) -> LoraConfig {
    LoraConfig::new(8, 16.0, targets)
}

/// Seconds of each of `runs` calls of `f`, after `warmup` untimed ones.
fn timed(warmup: usize, runs: usize, f: &mut dyn FnMut() -> Result<()>) -> Result<Vec<f64>> {
    for _ in 0..warmup {
        f()?;
    }
    (0..runs)
        .map(|_| {
            let s = Instant::now();
            f()?;
            Ok(s.elapsed().as_secs_f64())
        })
        .collect()
}

/// Run one workload `runs` times after `warmup` untimed runs.
pub fn run(
    workload: &str,
    ck: &Checkpoint,
    model: &Llama,
    warmup: usize,
    runs: usize,
    seq_len: usize,
) -> Result<Timing> {
    let dev = Device::Cpu;
    let (b, t) = (4, seq_len.max(2));
    let mut timing = Timing {
        workload: workload.to_string(),
        seconds: vec![],
        flops: 0.0,
        tokens: 0,
        peak_rss_mib: 0.0,
    };
    let time = |f: &mut dyn FnMut() -> Result<()>| timed(warmup, runs, f);
    let (workload, checkpointing) = match workload.strip_suffix("-ckpt") {
        Some(w) => (w, true),
        None => (workload, false),
    };
    let model = &model.clone().with_activation_checkpointing(checkpointing);
    match workload {
        "lora-qv" | "lora-qv-bf16" | "lora-qv-gguf" | "lora-qv-q8_0" | "lora-all" | "full" => {
            let ids = text_tokens(ck, b * (t + 1))?;
            let ids = Tensor::from_vec(ids, (b, t + 1), &dev)?;
            let input = ids.narrow(1, 0, t)?;
            let target = ids.narrow(1, 1, t)?;
            let (base, deltas, dp) = match workload {
                "full" => {
                    let mut base = ck.params.clone();
                    base.make_trainable(|_| true)?;
                    (base, DeltaSet::none(), ParamStore::new())
                }
                w => {
                    let targets: &[&str] = if w.starts_with("lora-qv") {
                        &["q_proj", "v_proj"]
                    } else {
                        &[
                            "q_proj",
                            "k_proj",
                            "v_proj",
                            "o_proj",
                            "gate_proj",
                            "up_proj",
                            "down_proj",
                        ]
                    };
                    let (lora, dp) = Lora::init(&lora_cfg(targets), &ck.params, 0)?;
                    let mut d = DeltaSet::none();
                    d.push(lora);
                    (ck.params.clone(), d, dp)
                }
            };
            let vars: Vec<candle_core::Var> = base
                .vars()
                .into_iter()
                .chain(dp.vars())
                .map(|(_, v)| v)
                .collect();
            let mut opt = adamw(vars)?;
            // Re-running the layers is not counted: GFLOP/s stays comparable across variants.
            let mult = if workload == "full" { 3.0 } else { 2.0 };
            timing.flops = mult * forward_flops(model, b * t, t);
            timing.seconds = time(&mut || {
                let h = model.forward_hidden(&base, &deltas, &dp, &input, None, None)?;
                let loss = model.lm_head_loss(&base, &h, &target, -100)?;
                let grads = crate::ops::backward(&loss)?;
                opt.step(&grads)?;
                Ok(())
            })?;
        }
        "fomaml" | "maml-exact" | "maml-hf" => {
            use crate::meta::{maml, InnerLoop, LmEpisode};
            let seqs = |offset: usize| -> Result<Vec<crate::data::batch::Sequence>> {
                let ids = text_tokens(ck, 2 * b * (t + 1))?;
                Ok((0..b)
                    .map(|i| {
                        let s = &ids[(offset + i) * (t + 1)..(offset + i + 1) * (t + 1)];
                        crate::data::batch::Sequence {
                            ids: s[..t].to_vec(),
                            targets: s[1..].iter().map(|&x| x as i64).collect(),
                        }
                    })
                    .collect())
            };
            let (lora, dp) = Lora::init(&lora_cfg(&["q_proj", "v_proj"]), &ck.params, 0)?;
            let mut deltas = DeltaSet::none();
            deltas.push(lora);
            let ep = LmEpisode {
                model,
                deltas: &deltas,
                support: seqs(0)?,
                query: seqs(b)?,
                batch: b,
                pad: 0,
            };
            let all = |_: &str| true;
            let steps = if workload == "fomaml" { 5 } else { 1 };
            let inner = InnerLoop {
                steps,
                lr: 0.05,
                adapted: &all,
                learned_lrs: None,
            };
            let meta_vars = dp.vars();
            // Forward-pass equivalents: a first-order step is ~2 (forward + input gradients);
            // differentiating through one inner step adds ~2 more; Hessian-free adds 2 gradients.
            let fwd_equiv = match workload {
                "fomaml" => 2.0 * (steps as f64 + 1.0),
                "maml-exact" => 6.0,
                _ => 8.0,
            };
            timing.flops = fwd_equiv * forward_flops(model, b * t, t);
            timing.seconds = time(&mut || {
                match workload {
                    "fomaml" => maml::first_order(&ep, &ck.params, &dp, &inner, &meta_vars)?,
                    "maml-exact" => maml::exact(&ep, &ck.params, &dp, &inner, &meta_vars)?,
                    _ => maml::hessian_free(&ep, &ck.params, &dp, &inner, &meta_vars, 1e-3)?,
                };
                Ok(())
            })?;
        }
        "tams-forward" | "tams-forward-all" => {
            use crate::meta::tams::{with_arch, Architecture, Op, TamsConfig};
            let ids = Tensor::from_vec(text_tokens(ck, b * t)?, (b, t), &dev)?;
            let dims =
                crate::peft::config::ModelDims::of(&crate::model::Arch::Llama(model.cfg.clone()));
            let tc = TamsConfig::default();
            let params = tc.init(dims, &ck.params, 3)?;
            let (cell, _) = tc.build(dims, &params)?;
            let mut deltas = DeltaSet::none();
            deltas.push(cell);
            // A fixed mix of cheap and expensive ops.
            let arch = Architecture {
                edges: [
                    Op::Glu,
                    Op::Conv3Relu,
                    Op::LinearRelu,
                    Op::Conv5Relu,
                    Op::Identity,
                    Op::Glu,
                    Op::None,
                    Op::Conv3Relu,
                    Op::LinearRelu,
                ],
            };
            let one_hot = arch.one_hot(candle_core::DType::F32, &dev)?;
            let arch_t = if workload == "tams-forward" {
                one_hot
            } else {
                candle_core::Var::from_tensor(&one_hot)?.as_tensor().clone()
            };
            let p = with_arch(&params, arch_t)?;
            timing.flops = forward_flops(model, b * t, t);
            timing.seconds = time(&mut || {
                model.forward(&ck.params, &deltas, &p, &ids, None)?;
                Ok(())
            })?;
        }
        "matmul" => {
            let n = 1024;
            let a = Tensor::randn(0f32, 1.0, (n, n), &dev)?;
            let bm = Tensor::randn(0f32, 1.0, (n, n), &dev)?;
            timing.flops = 2.0 * (n * n * n) as f64;
            timing.seconds = time(&mut || {
                a.matmul(&bm)?;
                Ok(())
            })?;
        }
        "startup" => {
            // What a training run does before its first step: read and dequantize the checkpoint,
            // build the tokenizer and the model, attach a fresh LoRA (the file is in the page
            // cache, as for PyTorch's warm `from_pretrained`).
            let path = ck.path.display().to_string();
            timing.seconds = time(&mut || {
                let ck = crate::model::load(&path, &dev)?;
                let crate::model::Arch::Llama(cfg) = &ck.arch else {
                    return Err(crate::Error::invalid("startup: a decoder model is needed"));
                };
                let _m = Llama::new(cfg.clone(), &dev)?;
                let (lora, _dp) = Lora::init(&lora_cfg(&["q_proj", "v_proj"]), &ck.params, 0)?;
                let mut d = DeltaSet::none();
                d.push(lora);
                Ok(())
            })?;
        }
        "forward" | "forward-packed" => {
            let ids = Tensor::from_vec(text_tokens(ck, t)?, (1, t), &dev)?;
            timing.flops = forward_flops(model, t, t);
            let e = ParamStore::new();
            timing.seconds = time(&mut || {
                model.forward(&ck.params, &DeltaSet::none(), &e, &ids, None)?;
                Ok(())
            })?;
        }
        "prefill" | "prefill-q8_0" | "prefill-q4_1" | "prefill-packed" => {
            let n = 128;
            let ids = Tensor::from_vec(text_tokens(ck, n)?, (1, n), &dev)?;
            timing.tokens = n;
            timing.flops = forward_flops(model, n, n);
            let e = ParamStore::new();
            timing.seconds = time(&mut || {
                let mut cache = crate::model::KvCache::new(model.cfg.num_hidden_layers);
                model.forward_last(&ck.params, &DeltaSet::none(), &e, &ids, &mut cache)?;
                Ok(())
            })?;
        }
        "decode" | "decode-q8_0" | "decode-q4_1" | "decode-bf16" | "decode-packed" => {
            let prompt = text_tokens(ck, 32)?;
            let n = 64;
            timing.tokens = n;
            timing.flops = forward_flops(model, n, 32 + n / 2);
            let e = ParamStore::new();
            let none = DeltaSet::none();
            let once = || -> Result<f64> {
                let mut decoder = crate::generate::Decoder::new(model, &ck.params, &none, &e);
                let mut id = decoder.next_greedy(&prompt)?;
                let s = Instant::now();
                for _ in 0..n {
                    id = decoder.next_greedy(&[id])?;
                }
                Ok(s.elapsed().as_secs_f64())
            };
            for _ in 0..warmup {
                once()?;
            }
            timing.seconds = (0..runs).map(|_| once()).collect::<Result<_>>()?;
        }
        "generate" | "generate-q8_0" | "generate-q4_1" => {
            let prompt = text_tokens(ck, 32)?;
            let opts = GenerateOptions {
                max_new_tokens: 64,
                stop_at_eos: false,
                ..Default::default()
            };
            timing.tokens = 64;
            timing.flops = forward_flops(model, 96, 96);
            let e = ParamStore::new();
            timing.seconds = time(&mut || {
                generate(
                    model,
                    &ck.params,
                    &DeltaSet::none(),
                    &e,
                    &ck.tokenizer,
                    &prompt,
                    &opts,
                    |_| {},
                )?;
                Ok(())
            })?;
        }
        other => {
            return Err(Error::invalid(format!(
                "unknown workload `{other}` (known: {})",
                WORKLOADS.map(|w| w.0).join(", ")
            )))
        }
    }
    timing.peak_rss_mib = peak_rss_mib();
    Ok(timing)
}

/// The MiniLM workload: all-MiniLM-L6-v2 + LoRA r=8 on query,value + a linear head on the
/// mean-pooled states, one AdamW classifier step on 16 x 64 tokens (16 classes).
pub fn run_encoder(
    workload: &str,
    ck: &Checkpoint,
    model: &crate::model::Bert,
    warmup: usize,
    runs: usize,
) -> Result<Timing> {
    if workload != "minilm-lora" && workload != "minilm-lora-ckpt" {
        return Err(Error::invalid(format!(
            "unknown encoder workload `{workload}`"
        )));
    }
    let dev = Device::Cpu;
    let (b, t, labels) = (16, 64, 16);
    let ids = Tensor::from_vec(text_tokens(ck, b * t)?, (b, t), &dev)?;
    let mask = Tensor::ones((b, t), candle_core::DType::U32, &dev)?;
    let target = Tensor::from_vec(
        (0..b as u32).map(|i| i % labels).collect::<Vec<_>>(),
        b,
        &dev,
    )?;
    let (lora, dp) = Lora::init(&lora_cfg(&["query", "value"]), &ck.params, 0)?;
    let mut deltas = DeltaSet::none();
    deltas.push(lora);
    let d = model.cfg.hidden_size;
    let hw = candle_core::Var::from_tensor(
        &(Tensor::randn(0f32, 1.0, (labels as usize, d), &dev)? * 0.02)?,
    )?;
    let hb = candle_core::Var::zeros(labels as usize, candle_core::DType::F32, &dev)?;
    let vars: Vec<candle_core::Var> = dp
        .vars()
        .into_iter()
        .map(|(_, v)| v)
        .chain([hw.clone(), hb.clone()])
        .collect();
    let mut opt = adamw(vars)?;
    let mut timing = Timing {
        workload: workload.to_string(),
        seconds: vec![],
        flops: 0.0,
        tokens: 0,
        peak_rss_mib: 0.0,
    };
    // Forward + input gradients, no frozen weight gradients: ~2 x 2 x params x tokens.
    let c = &model.cfg;
    let per_token = c.num_hidden_layers as f64
        * (4.0 * (d * d) as f64 + 2.0 * (d * c.intermediate_size) as f64);
    timing.flops = 2.0 * 2.0 * per_token * (b * t) as f64;
    let mut step = || -> Result<()> {
        let states = model.forward(&ck.params, &deltas, &dp, &ids, None, &mask)?;
        let pooled = states.mean(1)?;
        let logits = crate::ops::linear(&pooled, hw.as_tensor(), Some(hb.as_tensor()))?;
        let loss =
            crate::ops::cross_entropy(&logits, &target.to_dtype(candle_core::DType::I64)?, -100)?;
        opt.step(&crate::ops::backward(&loss)?)?;
        Ok(())
    };
    timing.seconds = timed(warmup, runs, &mut step)?;
    timing.peak_rss_mib = peak_rss_mib();
    Ok(timing)
}

/// Peak resident set size of this process (VmHWM), in MiB; 0 where /proc is unavailable.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => 0.5 * (s[n / 2 - 1] + s[n / 2]),
    }
}
