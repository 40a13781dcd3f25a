use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use metapeft::data::{self, batch, datasets, k_shot, TaskKind};
use metapeft::io::{self, AdapterFormat};
use metapeft::model::{self, Arch, Bert, Llama};
use metapeft::params::ParamStore;
use metapeft::peft::config::{config_from_file, default_config};
use metapeft::peft::DeltaSet;
use metapeft::train::objectives::{new_head, BatchOrder, DecoderLm, EncoderClassifier};
use metapeft::train::{train, OptimizerConfig, Schedule, TrainConfig};
use serde::{Deserialize, Serialize};

#[derive(clap::Args)]
#[command(
    after_help = "Every option can also come from --config run.toml (same names, with _ for -); \
options given on the command line win. The resolved configuration is written to OUT/run.json.\n\n\
Examples:\n  metapeft adapt --model $MINILM --task clinc150/banking --method lora --shots 10 --out runs/clinc\n  \
metapeft adapt --task fortunes/science --method lora --shots 50 --steps 60 --out runs/fortunes\n\n\
Supported now: decoders on language-modelling and prompt->completion tasks (metric: perplexity), encoders on \
classification tasks (metrics: accuracy, macro-F1)."
)]
pub struct Args {
    /// A TOML file with any of the options below
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    run: RunArgs,
    /// Continue from the checkpoint in --out
    #[arg(long)]
    resume: bool,
}

#[derive(clap::Args, Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunArgs {
    /// Base model (default: SmolLM2-135M-Instruct)
    #[arg(long)]
    pub model: Option<String>,
    /// A task name from `metapeft tasks`
    #[arg(long)]
    pub task: Option<String>,
    /// lora, tarp, adapter, ia3, prompt_tuning, prefix_tuning, bitfit, ln_tuning, or full
    #[arg(long)]
    pub method: Option<String>,
    /// A JSON/TOML delta config file instead of the method's defaults
    #[arg(long)]
    pub method_config: Option<PathBuf>,
    /// Start from a `metapeft prepare` output: its base model and meta-learned delta init
    #[arg(long)]
    pub from: Option<PathBuf>,
    /// Training examples: per class for classification, in total otherwise
    #[arg(long)]
    pub shots: Option<usize>,
    #[arg(long)]
    pub steps: Option<usize>,
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Maximum tokens per training sequence
    #[arg(long)]
    pub max_len: Option<usize>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Evaluate on at most this many test examples
    #[arg(long)]
    pub eval_limit: Option<usize>,
    /// Prompt->completion tasks: also generate for this many test examples and report ROUGE
    /// (default 30; 0 to skip)
    #[arg(long)]
    pub generate_eval: Option<usize>,
    /// Maximum new tokens when generating for evaluation
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    #[arg(long)]
    pub out: Option<PathBuf>,
}

impl RunArgs {
    fn over(self, file: RunArgs) -> RunArgs {
        macro_rules! pick {
            ($($f:ident),*) => { RunArgs { $($f: self.$f.or(file.$f)),* } };
        }
        pick!(
            model,
            task,
            method,
            method_config,
            from,
            shots,
            steps,
            lr,
            batch_size,
            grad_accum,
            max_len,
            seed,
            eval_limit,
            generate_eval,
            max_new_tokens,
            out
        )
    }
}

fn eval_split(ds: &data::Dataset) -> Result<&'static str> {
    for s in ["test", "validation", "val", "dev"] {
        if ds.splits.get(s).is_some_and(|v| !v.is_empty()) {
            return Ok(s);
        }
    }
    bail!("task `{}` has no test/validation split", ds.name)
}

pub fn run(a: Args) -> Result<()> {
    let file = match &a.config {
        Some(p) => toml::from_str(
            &std::fs::read_to_string(p).with_context(|| format!("{}: cannot read", p.display()))?,
        )
        .with_context(|| format!("{}: bad run config", p.display()))?,
        None => RunArgs::default(),
    };
    let r = a.run.over(file);
    let task = r
        .task
        .clone()
        .context("--task is required (see `metapeft tasks`)")?;
    let out = r.out.clone().context("--out is required")?;
    let prepared = match &r.from {
        Some(p) => Some(io::prepared::read_info(p)?),
        None => None,
    };
    if let (Some(info), Some(m)) = (&prepared, &r.method) {
        if m.replace('-', "_") != info.method {
            bail!(
                "--method {m} differs from the prepared model's method `{}`",
                info.method
            );
        }
    }
    let method = match &prepared {
        Some(info) => info.method.clone(),
        None => r.method.clone().unwrap_or_else(|| "lora".into()),
    };
    let (shots, seed) = (r.shots.unwrap_or(16), r.seed.unwrap_or(0));
    let (steps, batch_size, max_len) = (
        r.steps.unwrap_or(50),
        r.batch_size.unwrap_or(8),
        r.max_len.unwrap_or(256),
    );
    let eval_limit = r.eval_limit.unwrap_or(200);
    std::fs::create_dir_all(&out)?;
    io::write_atomic(
        &out.join("run.json"),
        serde_json::to_string_pretty(&r)?.as_bytes(),
    )?;

    let spec = match (&r.model, &r.from) {
        (None, Some(p)) => io::prepared::model_spec(p)?,
        _ => super::model_or_default(r.model.clone(), metapeft::assets::SMOLLM2)?,
    };
    let ck = model::load(&spec, &Device::Cpu)?;
    let ds = datasets::load(&task, &metapeft::assets::data_dir(), false)?;
    let train_split = ["train", "validation", "val", "dev"]
        .into_iter()
        .find(|s| ds.splits.get(*s).is_some_and(|v| !v.is_empty()))
        .context("task has no training split")?;
    let test_split = eval_split(&ds)?;
    let template = prompt_template(&task);
    let apply = |v: Vec<data::Example>| -> Vec<data::Example> {
        v.into_iter()
            .map(|mut e| {
                if let data::Content::PromptCompletion { prompt, .. } = &mut e.content {
                    *prompt = template.replace("{prompt}", prompt);
                }
                e
            })
            .collect()
    };
    let train_ex = apply(k_shot(ds.split(train_split)?, shots, seed));
    // Test splits are often sorted (by intent, topic): evaluate on a seeded random subset.
    let all_test = ds.split(test_split)?;
    let test_ex: Vec<data::Example> = if all_test.len() > eval_limit {
        let mut idx: Vec<usize> = (0..all_test.len()).collect();
        rand::seq::SliceRandom::shuffle(
            &mut idx[..],
            &mut <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed ^ 0x7e57),
        );
        idx.truncate(eval_limit);
        idx.sort_unstable();
        apply(idx.into_iter().map(|i| all_test[i].clone()).collect())
    } else {
        apply(all_test.to_vec())
    };

    // The delta (or full fine-tuning).
    let (base, deltas, dp, adapter) = if method == "full" {
        let mut b = ck.params.clone();
        b.make_trainable(|n| {
            !n.ends_with("embed_tokens.weight") && !n.contains("word_embeddings")
        })?;
        (b, DeltaSet::none(), ParamStore::new(), None)
    } else {
        let ad = match &r.from {
            // The meta-learned initialisation, trained from here like a fresh delta.
            Some(p) => {
                let mut ad = io::load_adapter(&io::prepared::adapter_dir(p), &ck.arch, &ck.params)?;
                ad.params.make_trainable(|_| true)?;
                ad
            }
            None => {
                let cfg = match &r.method_config {
                    Some(p) => config_from_file(p)?,
                    None => default_config(&method, &ck.arch)?,
                };
                cfg.init(&ck.arch, &ck.params, seed)?
            }
        };
        let d = ad.attach(&ck.arch, &ck.params)?;
        (ck.params.clone(), d, ad.params.clone(), Some(ad))
    };
    let tc = TrainConfig {
        steps,
        lr: r.lr.unwrap_or(if method == "full" { 5e-5 } else { 1e-3 }),
        schedule: Schedule::Linear { warmup: steps / 10 },
        optimizer: OptimizerConfig::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        },
        grad_clip: Some(1.0),
        grad_accum: r.grad_accum.unwrap_or(1),
        eval_every: None,
        patience: None,
        higher_is_better: false,
        checkpoint_every: 10,
        halt_after: None,
    };
    let mut vars = base.vars();
    vars.extend(dp.vars());
    let report = match (&ck.arch, ds.kind) {
        (Arch::Llama(cfg), TaskKind::LanguageModeling | TaskKind::PromptCompletion) => {
            let m = Llama::new(cfg.clone(), &Device::Cpu)?;
            let (tr, t1) = batch::sequences(&ck.tokenizer, &train_ex, max_len)?;
            let (ev, t2) = batch::sequences(&ck.tokenizer, &test_ex, max_len)?;
            if t1 + t2 > 0 {
                eprintln!("metapeft: {} examples truncated to {max_len} tokens", t1 + t2);
            }
            let pad = ck.tokenizer.pad_id.or(ck.tokenizer.eos_ids.first().copied()).unwrap_or(0);
            let mut obj = DecoderLm {
                model: &m,
                base: &base,
                deltas: &deltas,
                params: &dp,
                order: BatchOrder::new(tr.len(), batch_size.min(tr.len().max(1)), tc.grad_accum, seed),
                train: tr,
                eval: ev,
                pad,
                last_tokens: 0,
            };
            let n_gen = if ds.kind == TaskKind::PromptCompletion { r.generate_eval.unwrap_or(30) } else { 0 };
            let max_new = r.max_new_tokens.unwrap_or(64);
            let before = obj.perplexity(8)?;
            eprintln!("perplexity before: {:.3} on {} tokens", before.value(), before.tokens);
            let rouge_before = rouge_eval(&m, &ck, &base, &deltas, &dp, &test_ex, n_gen, max_new, &out.join("generations-before.jsonl"))?;
            let rep = train(&tc, vars, &mut obj, Some(&out), a.resume)?;
            let after = obj.perplexity(8)?;
            eprintln!("perplexity after:  {:.3}", after.value());
            let rouge_after = rouge_eval(&m, &ck, &base, &deltas, &dp, &test_ex, n_gen, max_new, &out.join("generations-after.jsonl"))?;
            let mut j = serde_json::json!({"metric": "perplexity", "before": before.value(), "after": after.value(), "eval_tokens": after.tokens, "train": rep});
            if n_gen > 0 {
                eprintln!("ROUGE-L F1 before {:.4}, after {:.4} ({n_gen} generated)", rouge_before[2], rouge_after[2]);
                j["rouge_examples"] = n_gen.min(test_ex.len()).into();
                j["rouge_before"] = serde_json::json!({"rouge1": rouge_before[0], "rouge2": rouge_before[1], "rougeL": rouge_before[2]});
                j["rouge_after"] = serde_json::json!({"rouge1": rouge_after[0], "rouge2": rouge_after[1], "rougeL": rouge_after[2]});
            }
            j
        }
        (Arch::Bert(cfg), TaskKind::Classification) => {
            let m = Bert::new(cfg.clone());
            let labels = {
                let mut l: Vec<String> = train_ex.iter().filter_map(|e| e.label().map(String::from)).collect();
                l.sort();
                l.dedup();
                l
            };
            if let Some(e) = test_ex.iter().find(|e| e.label().is_some_and(|l| !labels.contains(&l.to_string()))) {
                bail!("test split has label `{}` that the training examples never show", e.label().unwrap_or_default());
            }
            let head = new_head(labels.len(), cfg.hidden_size, seed)?;
            vars.extend(head.vars());
            let mut obj = EncoderClassifier {
                model: &m,
                tok: &ck.tokenizer,
                base: &base,
                deltas: &deltas,
                params: &dp,
                head: &head,
                labels: labels.clone(),
                order: BatchOrder::new(train_ex.len(), batch_size.min(train_ex.len()), tc.grad_accum, seed),
                train: train_ex.clone(),
                eval: test_ex.clone(),
                pad: cfg.pad_token_id,
            };
            let (p0, g0) = obj.predict(32)?;
            let before = (metapeft::eval::classification::accuracy(&p0, &g0), metapeft::eval::classification::macro_f1(&p0, &g0));
            let rep = train(&tc, vars, &mut obj, Some(&out), a.resume)?;
            let (p1, g1) = obj.predict(32)?;
            let after = (metapeft::eval::classification::accuracy(&p1, &g1), metapeft::eval::classification::macro_f1(&p1, &g1));
            eprintln!("accuracy {:.4} -> {:.4}, macro-F1 {:.4} -> {:.4}", before.0, after.0, before.1, after.1);
            let tensors: std::collections::HashMap<String, candle_core::Tensor> =
                head.iter().map(|(n, p)| (n.to_string(), p.tensor().detach())).collect();
            io::save_safetensors(&tensors, &out.join("head.safetensors"))?;
            io::write_atomic(&out.join("labels.json"), serde_json::to_string(&labels)?.as_bytes())?;
            serde_json::json!({"metric": "accuracy", "before": before.0, "after": after.0,
                               "macro_f1_before": before.1, "macro_f1_after": after.1, "labels": labels.len(), "train": rep})
        }
        (arch, kind) => bail!(
            "adapting a {} model on a {kind:?} task is not supported yet (decoders: language modelling and \
             prompt->completion; encoders: classification)",
            arch.name()
        ),
    };
    match adapter {
        Some(ad) => io::save_adapter(
            &ad,
            &ck.arch,
            &super::peft::base_name(&ck),
            &out.join("adapter"),
            AdapterFormat::Native,
        )?,
        None => io::hf_dir::write_parts(&ck.arch, &base, &ck.tokenizer, &out.join("model"))?,
    }
    let full = serde_json::json!({"task": task, "method": method, "from": r.from, "shots": shots, "train_examples": train_ex.len(),
                                  "eval_examples": test_ex.len(), "steps": steps, "seed": seed, "model": spec, "result": report});
    io::write_atomic(
        &out.join("report.json"),
        serde_json::to_string_pretty(&full)?.as_bytes(),
    )?;
    println!("{}", serde_json::to_string_pretty(&full["result"])?);
    Ok(())
}

/// How prompt->completion examples are shown to a decoder.
pub(crate) fn prompt_template(task: &str) -> &'static str {
    match task.split('/').next().unwrap_or("") {
        "dialogsum" | "scitldr" | "multilexsum" => "{prompt}\nSummary:",
        "dailydialog" | "multiwoz" | "persona-chat" => "{prompt}\n",
        _ => "{prompt}",
    }
}

/// Mean over examples of the best-reference ROUGE-1/2/L F1 of greedy generations; the
/// generations are written to `log` (JSONL) for inspection.
#[allow(clippy::too_many_arguments)]
fn rouge_eval(
    m: &Llama,
    ck: &model::Checkpoint,
    base: &ParamStore,
    deltas: &DeltaSet,
    dp: &ParamStore,
    examples: &[data::Example],
    n: usize,
    max_new: usize,
    log: &std::path::Path,
) -> Result<[f64; 3]> {
    use metapeft::eval::rouge;
    use metapeft::generate::{generate, GenerateOptions};
    let mut sums = [0.0; 3];
    let mut lines = String::new();
    let take: Vec<&data::Example> = examples.iter().take(n).collect();
    deltas.set_training(false);
    for e in &take {
        let data::Content::PromptCompletion {
            prompt, references, ..
        } = &e.content
        else {
            continue;
        };
        let mut ids = ck.tokenizer.encode(prompt, false)?;
        let keep = 768usize;
        if ids.len() > keep {
            ids.drain(..ids.len() - keep);
        }
        // No stop string: models often start with a newline after "Summary:"; keep the first
        // non-empty line instead.
        let opts = GenerateOptions {
            max_new_tokens: max_new,
            ..Default::default()
        };
        let g = generate(m, base, deltas, dp, &ck.tokenizer, &ids, &opts, |_| {})?;
        let text = g
            .text
            .trim_start()
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_string();
        let best = |f: &dyn Fn(&rouge::Rouge) -> f64| -> f64 {
            references
                .iter()
                .map(|r| f(&rouge::rouge(r, &text)))
                .fold(0.0, f64::max)
        };
        sums[0] += best(&|s| s.rouge1.fmeasure);
        sums[1] += best(&|s| s.rouge2.fmeasure);
        sums[2] += best(&|s| s.rouge_l.fmeasure);
        lines.push_str(
            &serde_json::json!({"generated": text, "references": references}).to_string(),
        );
        lines.push('\n');
    }
    if !take.is_empty() {
        io::write_atomic(log, lines.as_bytes())?;
    }
    let k = take.len().max(1) as f64;
    Ok([sums[0] / k, sums[1] / k, sums[2] / k])
}
