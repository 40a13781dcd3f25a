use anyhow::{bail, Context, Result};
use candle_core::Device;
use metapeft::bench::{self, median, Timing, WORKLOADS};
use metapeft::model::{self, Arch, Bert, Llama};

#[derive(clap::Args)]
#[command(
    after_help = "Each workload runs in its own process so that its peak RSS is its own.\n\
Examples:\n  metapeft bench                       # every workload, 5 timed runs each\n  \
metapeft bench --workload lora-qv --workload full --runs 7\n\n\
Workloads:\n  matmul    f32 1024^3 matmul: the machine's peak (the % column of the others)\n  lora-qv   LoRA r=8 on q,v: train step (fwd+bwd+AdamW), 4 x 128 tokens\n  \
lora-all  LoRA r=8 on all 7 linears: train step, 4 x 128\n  lora-qv-bf16  lora-qv with the frozen base stored in bf16\n  lora-qv-gguf  lora-qv on the GGUF's own quantized blocks (QLoRA-style)\n  lora-qv-q8_0  lora-qv on the base requantized to Q8_0\n  \
lora-qv-ckpt, lora-all-ckpt, lora-qv-gguf-ckpt, fomaml-ckpt, minilm-lora-ckpt, full-ckpt  the same with activation checkpointing (less memory, one more forward)\n  minilm-lora  all-MiniLM-L6-v2 + LoRA r=8 (query, value) classifier step, 16 x 64 (always MiniLM)\n  startup   load checkpoint + tokenizer + model + LoRA (everything before the first step)\n  full      full fine-tuning step, 4 x 128\n  \
forward   forward pass, 1 x 128\n  forward-packed, prefill-packed, decode-packed  the same from the inference layout (--weights packed)\n  generate  greedy generation, 32-token prompt + 64 new tokens\n  \
generate-q8_0, generate-q4_1  the same from quantized weights (requantized from the file as needed)\n  \
decode, decode-q8_0, decode-q4_1, decode-bf16  the 64 new tokens alone (tok/s of decoding; the prompt is not timed)\n  \
prefill, prefill-q8_0, prefill-q4_1  a 128-token prompt into an empty KV cache, last logits\n  \
fomaml    FOMAML episode: 5 inner steps on 4 x 128 + query 4 x 128 (LoRA q,v)\n  \
maml-exact  exact second-order MAML episode, 1 inner step\n  maml-hf   Hessian-free MAML episode, 1 inner step\n  \
tams-forward      forward 4 x 128 with a TAMS cell per layer (one-hot arch, unselected ops skipped)\n  \
tams-forward-all  the same with every op computed (as when training the controller)"
)]
pub struct Args {
    /// A decoder model (default: SmolLM2-135M-Instruct)
    #[arg(long)]
    model: Option<String>,
    /// Workloads to run (repeatable; default: all)
    #[arg(long)]
    workload: Vec<String>,
    /// Timed runs per workload
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Untimed warm-up runs per workload
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Tokens per sequence of the training, meta-learning (batch 4) and forward (batch 1) workloads
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// Print results as JSON lines
    #[arg(long)]
    json: bool,
    /// Internal: run one workload in this process and print its JSON
    #[arg(long, hide = true)]
    child: bool,
}

pub fn run(a: Args) -> Result<()> {
    let spec = super::model_or_default(a.model.clone(), metapeft::assets::SMOLLM2)?;
    if a.child {
        let w = a.workload.first().context("--child needs one --workload")?;
        if w.starts_with("minilm") {
            let spec = super::model_or_default(None, metapeft::assets::MINILM)?;
            let ck = model::load(&spec, &Device::Cpu)?;
            let Arch::Bert(cfg) = &ck.arch else {
                bail!("{spec} is not an encoder")
            };
            let m = Bert::new(cfg.clone()).with_activation_checkpointing(w.ends_with("-ckpt"));
            let t = bench::run_encoder(w, &ck, &m, a.warmup, a.runs)?;
            println!("{}", serde_json::to_string(&t)?);
            return Ok(());
        }
        let ck = bench::storage_of(w).load(&spec)?;
        let Arch::Llama(cfg) = &ck.arch else {
            bail!("bench needs a decoder model")
        };
        let m = Llama::new(cfg.clone(), &Device::Cpu)?;
        let t = bench::run(w, &ck, &m, a.warmup, a.runs, a.seq_len)?;
        println!("{}", serde_json::to_string(&t)?);
        return Ok(());
    }
    let names: Vec<String> = if a.workload.is_empty() {
        WORKLOADS.iter().map(|w| w.0.to_string()).collect()
    } else {
        a.workload.clone()
    };
    for n in &names {
        if !WORKLOADS.iter().any(|w| w.0 == n) {
            bail!(
                "unknown workload `{n}` (known: {})",
                WORKLOADS.map(|w| w.0).join(", ")
            );
        }
    }
    let exe = std::env::current_exe()?;
    if !a.json {
        println!(
            "model: {spec}; {} timed runs after {} warm-up; threads: {}",
            a.runs,
            a.warmup,
            rayon::current_num_threads()
        );
        println!(
            "{:<16} {:>9} {:>9} {:>9} {:>10} {:>9}  notes",
            "workload", "median s", "min s", "max s", "peak MiB", "GFLOP/s"
        );
    }
    let mut peak_gflops: Option<f64> = None;
    for n in &names {
        let out = std::process::Command::new(&exe)
            .args(["bench", "--child", "--model", &spec, "--workload", n])
            .args([
                "--runs",
                &a.runs.to_string(),
                "--warmup",
                &a.warmup.to_string(),
                "--seq-len",
                &a.seq_len.to_string(),
            ])
            .output()?;
        if !out.status.success() {
            // Report and go on: one workload running out of memory should not hide the others.
            let why = match std::os::unix::process::ExitStatusExt::signal(&out.status) {
                Some(9) => "killed by signal 9 (out of memory?)".to_string(),
                Some(sig) => format!("killed by signal {sig}"),
                None => String::from_utf8_lossy(&out.stderr).trim().to_string(),
            };
            if a.json {
                println!("{}", serde_json::json!({"workload": n, "failed": why}));
            } else {
                println!("{n:<10} failed: {why}");
            }
            continue;
        }
        let t: Timing =
            serde_json::from_slice(&out.stdout).context("reading the workload's result")?;
        if a.json {
            println!("{}", serde_json::to_string(&t)?);
            continue;
        }
        let med = median(&t.seconds);
        let min = t.seconds.iter().cloned().fold(f64::INFINITY, f64::min);
        let max = t.seconds.iter().cloned().fold(0.0, f64::max);
        let gflops = t.flops / med / 1e9;
        if n == "matmul" {
            peak_gflops = Some(gflops);
        }
        let mut note = if t.tokens > 0 {
            let what = if n.starts_with("prefill") {
                "prompt"
            } else {
                "new"
            };
            format!("{:.1} {what} tokens/s", t.tokens as f64 / med)
        } else {
            String::new()
        };
        if let (Some(p), true) = (peak_gflops, t.flops > 0.0 && n != "matmul") {
            note = format!(
                "{note}{}{:.0}% of matmul peak",
                if note.is_empty() { "" } else { "; " },
                100.0 * gflops / p
            );
        }
        println!(
            "{:<16} {:>9.3} {:>9.3} {:>9.3} {:>10.0} {:>9.1}  {}",
            n, med, min, max, t.peak_rss_mib, gflops, note
        );
    }
    Ok(())
}
