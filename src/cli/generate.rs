use std::io::Write;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use metapeft::generate::{generate, GenerateOptions};
use metapeft::model::{self, Arch, ChatMessage, Llama};
use metapeft::params::ParamStore;
use metapeft::peft::DeltaSet;

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  metapeft generate --chat --prompt \"What is the capital of France?\"\n  \
metapeft generate --prompt \"Once upon a time\" --temperature 0.8 --top-p 0.95 --seed 1\n  \
metapeft generate --prompt \"def add(a, b):\" --logprobs 3 --json"
)]
pub struct Args {
    /// A GGUF file, a Hugging Face model directory, or a hub id (default: SmolLM2-135M-Instruct)
    #[arg(long)]
    model: Option<String>,
    /// An adapter to apply: a PEFT or metapeft directory, or a GGUF LoRA file
    #[arg(long)]
    adapter: Option<std::path::PathBuf>,
    /// The prompt, used verbatim (no BOS or template unless the tokenizer config asks for them)
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// 0 is greedy decoding
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Sample only among the k most likely tokens
    #[arg(long)]
    top_k: Option<usize>,
    /// Sample only within the smallest set of tokens whose probability reaches p
    #[arg(long)]
    top_p: Option<f64>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when this text appears (repeatable); it is not included in the output
    #[arg(long)]
    stop: Vec<String>,
    /// Treat the prompt as a user message and apply the model's chat template
    #[arg(long)]
    chat: bool,
    /// A system message for --chat (otherwise the template's default, if any)
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Report the top-N log-probabilities of each generated token
    #[arg(long, default_value_t = 0)]
    logprobs: usize,
    /// Print {prompt_ids, generated_ids, text, steps:[{ids, logprobs}]} as JSON
    #[arg(long)]
    json: bool,
    /// How to hold the weights: packed (f32 in the matmul kernel's own layout: the f32 results,
    /// prompts ~5-10% faster; the default without --adapter); f32 (row-major, the default with
    /// --adapter, since some methods read the base weights themselves); bf16 or f16; gguf (keep
    /// the GGUF file's own blocks: 4-8x less memory traffic per token; Q8_0/Q4_1 use integer
    /// kernels); q8_0, q4_1 or q4_0 (every matrix requantized to that format). LoRA-style
    /// adapters work with all of them
    #[arg(long)]
    weights: Option<String>,
}

pub fn run(a: Args) -> Result<()> {
    let spec = super::model_or_default(a.model.clone(), metapeft::assets::SMOLLM2)?;
    let weights = a.weights.as_deref().unwrap_or(match a.adapter {
        Some(_) => "f32",
        None => "packed",
    });
    let ck = model::BaseStorage::parse(weights)?.load(&spec)?;
    let cfg = match &ck.arch {
        Arch::Llama(c) => c.clone(),
        Arch::Bert(_) => {
            bail!("{spec} is an encoder; `generate` needs a decoder (use `metapeft embed`)")
        }
    };
    let tok = &ck.tokenizer;
    let prompt = if a.chat {
        let mut msgs = vec![];
        if let Some(s) = &a.system {
            msgs.push(ChatMessage {
                role: "system".into(),
                content: s.clone(),
            });
        }
        msgs.push(ChatMessage::user(a.prompt.clone()));
        tok.render_chat(&msgs, true)?
    } else {
        a.prompt.clone()
    };
    let ids = tok.encode(&prompt, true).context("tokenizing the prompt")?;
    let llama = Llama::new(cfg, &Device::Cpu)?;
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
        stop: a.stop.clone(),
        logprobs: a.logprobs,
        stop_at_eos: true,
    };
    let (deltas, delta_params) = match &a.adapter {
        Some(path) => {
            let ad = super::export::load_adapter(path, &ck)?;
            (ad.attach(&ck.arch, &ck.params)?, ad.params)
        }
        None => (DeltaSet::none(), ParamStore::new()),
    };
    let stream = !a.json;
    let mut out = std::io::stdout();
    let g = generate(
        &llama,
        &ck.params,
        &deltas,
        &delta_params,
        tok,
        &ids,
        &opts,
        |piece| {
            if stream {
                let _ = out.write_all(piece.as_bytes());
                let _ = out.flush();
            }
        },
    )?;
    if a.json {
        println!("{}", serde_json::to_string(&g)?);
    } else {
        println!();
        if a.logprobs > 0 {
            for (id, s) in g.generated_ids.iter().zip(&g.steps) {
                let alts: Vec<String> = s
                    .ids
                    .iter()
                    .zip(&s.logprobs)
                    .map(|(i, l)| {
                        format!("{:?} {l:.4}", tok.decode(&[*i], false).unwrap_or_default())
                    })
                    .collect();
                eprintln!(
                    "{:>8} {:<16} | {}",
                    id,
                    format!("{:?}", tok.decode(&[*id], false).unwrap_or_default()),
                    alts.join(", ")
                );
            }
        }
    }
    Ok(())
}
