use anyhow::Result;
use candle_core::Device;
use metapeft::assets;
use metapeft::generate::{generate, GenerateOptions};
use metapeft::model::{self, bert::cosine, Arch, Bert, ChatMessage, Llama};
use metapeft::params::ParamStore;
use metapeft::peft::DeltaSet;

#[derive(clap::Args)]
#[command(
    after_help = "The demo prints every `metapeft` command it runs, so each step can be re-run \
or changed by hand. Re-running it reuses a finished preparation in OUT (and resumes an interrupted one)."
)]
pub struct Args {
    /// The question to ask the chat model
    #[arg(long, default_value = "What is the capital of France?")]
    question: String,
    /// Where the demo writes its prepared model and adaptation runs
    #[arg(long, default_value = "runs/demo")]
    out: std::path::PathBuf,
    /// Outer steps of the preparation (fewer: faster, smaller gain)
    #[arg(long, default_value_t = 24)]
    meta_steps: usize,
    /// Held-out domain to adapt to
    #[arg(long, default_value = "fortunes/science")]
    task: String,
    /// Only the quick model checks (chat answer, sentence similarity)
    #[arg(long)]
    no_meta: bool,
}

pub fn run(a: Args) -> Result<()> {
    let smol = assets::ensure(assets::SMOLLM2)?;
    let minilm = assets::ensure(assets::MINILM)?;
    let t0 = std::time::Instant::now();
    let ck = model::load(&smol.to_string_lossy(), &Device::Cpu)?;
    let Arch::Llama(cfg) = ck.arch.clone() else {
        unreachable!("SmolLM2 is a decoder")
    };
    println!(
        "loaded SmolLM2-135M-Instruct ({}) in {:.2}s",
        ck.storage,
        t0.elapsed().as_secs_f64()
    );
    let prompt = ck
        .tokenizer
        .render_chat(&[ChatMessage::user(a.question.clone())], true)?;
    let ids = ck.tokenizer.encode(&prompt, true)?;
    let llama = Llama::new(cfg, &Device::Cpu)?;
    println!("user: {}", a.question);
    print!("assistant: ");
    let t1 = std::time::Instant::now();
    let g = generate(
        &llama,
        &ck.params,
        &DeltaSet::none(),
        &ParamStore::new(),
        &ck.tokenizer,
        &ids,
        &GenerateOptions::default(),
        |p| {
            print!("{p}");
            let _ = std::io::Write::flush(&mut std::io::stdout());
        },
    )?;
    let dt = t1.elapsed().as_secs_f64();
    println!(
        "\n({} tokens in {dt:.2}s, {:.1} tokens/s)",
        g.generated_ids.len(),
        g.generated_ids.len() as f64 / dt
    );

    let ck = model::load(&minilm.to_string_lossy(), &Device::Cpu)?;
    let Arch::Bert(cfg) = &ck.arch else {
        unreachable!("MiniLM is an encoder")
    };
    let texts: Vec<String> = [
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The stock market crashed today.",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let e = Bert::new(cfg.clone()).embed_texts(&ck.params, &ck.tokenizer, &texts)?;
    println!("\nall-MiniLM-L6-v2 sentence similarity:");
    for j in 1..texts.len() {
        println!(
            "  cos({:?}, {:?}) = {:.4}",
            texts[0],
            texts[j],
            cosine(&e[0], &e[j])
        );
    }
    if a.no_meta {
        return Ok(());
    }
    meta_demo(&a)
}

/// Run `metapeft ARGS` (this executable), echoing the command; the child's report on stdout is
/// returned parsed.
fn metapeft(args: &[String]) -> Result<serde_json::Value> {
    println!("\n$ metapeft {}", args.join(" "));
    let exe = std::env::current_exe()?;
    let out = std::process::Command::new(exe)
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()?;
    if !out.status.success() {
        anyhow::bail!("`metapeft {}` failed", args.join(" "));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Prepare SmolLM2 on meta-train domains of `lm-domains`, then adapt the base and the prepared
/// model to a held-out domain with the same 50 examples and budget; print both.
fn meta_demo(a: &Args) -> Result<()> {
    let s = |x: &str| x.to_string();
    let out = a.out.to_string_lossy().to_string();
    let prep = format!("{out}/prepared");
    println!(
        "\nMeta-learning demo: prepare on {} outer steps of lm-domains episodes (meta-test domains held out), \
then adapt to {} from the base and from the prepared model.",
        a.meta_steps, a.task
    );
    let t0 = std::time::Instant::now();
    if metapeft::io::prepared::is_prepared(std::path::Path::new(&prep)) {
        println!("\nreusing the prepared model in {prep} (delete it to prepare again)");
    } else {
        let r = metapeft(&[
            s("prepare"),
            s("--family"),
            s("lm-domains"),
            s("--algo"),
            s("fomaml"),
            s("--inner-steps"),
            s("2"),
            s("--inner-lr"),
            s("0.3"),
            s("--meta-batch"),
            s("2"),
            s("--meta-steps"),
            a.meta_steps.to_string(),
            s("--max-len"),
            s("64"),
            s("--valid-every"),
            s("8"),
            s("--out"),
            prep.clone(),
            s("--resume"),
        ])?;
        if let Some(v) = r["valid"].as_array() {
            let at = |x: &serde_json::Value| {
                format!(
                    "{:.3} (step {})",
                    x["loss_after"].as_f64().unwrap_or(f64::NAN),
                    x["step"]
                )
            };
            let steps: Vec<String> = v.iter().map(at).collect();
            println!(
                "meta-valid query loss (held-out domains, after 2 inner steps): {}",
                steps.join(" -> ")
            );
        }
    }
    let task_dir = a.task.replace('/', "-");
    let common = [
        s("--task"),
        a.task.clone(),
        s("--shots"),
        s("50"),
        s("--steps"),
        s("30"),
        s("--max-len"),
        s("64"),
        s("--eval-limit"),
        s("100"),
        s("--seed"),
        s("0"),
    ];
    let mut base_args = vec![
        s("adapt"),
        s("--method"),
        s("lora"),
        s("--out"),
        format!("{out}/base-{task_dir}"),
    ];
    base_args.extend(common.iter().cloned());
    let base = metapeft(&base_args)?;
    let mut prep_args = vec![
        s("adapt"),
        s("--from"),
        prep.clone(),
        s("--out"),
        format!("{out}/prepared-{task_dir}"),
    ];
    prep_args.extend(common.iter().cloned());
    let prepared = metapeft(&prep_args)?;
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    println!(
        "\n{} test perplexity (lower is better), 50 training examples, 30 LoRA steps:",
        a.task
    );
    println!("  {:<22} {:>10} {:>10}", "start", "before", "after");
    println!(
        "  {:<22} {:>10.2} {:>10.2}",
        "base SmolLM2",
        f(&base, "before"),
        f(&base, "after")
    );
    println!(
        "  {:<22} {:>10.2} {:>10.2}",
        "prepared (FOMAML)",
        f(&prepared, "before"),
        f(&prepared, "after")
    );
    println!(
        "\n(total {:.1} min; outputs in {out})",
        t0.elapsed().as_secs_f64() / 60.0
    );
    Ok(())
}
