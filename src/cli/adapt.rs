use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use metapeft::data::{batch, TaskKind};
use metapeft::io::{self, AdapterFormat};
use metapeft::meta::tams::{self, Architecture, TamsConfig};
use metapeft::model::{Arch, BaseStorage, Bert, Checkpoint, Llama};
use metapeft::params::ParamStore;
use metapeft::peft::config::{config_from_file, default_config, ModelDims};
use metapeft::peft::DeltaSet;
use metapeft::train::objectives::{
    load_head, lower_is_better, new_head, rouge_eval, save_head, BatchOrder, DecoderClassifier,
    DecoderHead, DecoderLm, EncoderClassifier, EncoderTagger, Evaluate, Metrics, Monitored,
    HEAD_DECODER_LAST, HEAD_ENCODER_POOLED, HEAD_TOKEN,
};
use metapeft::train::setup::{self, TaskData};
use metapeft::train::{train, Objective, OptimizerConfig, Schedule, TrainConfig, TrainReport};
use serde::{Deserialize, Serialize};

#[derive(clap::Args)]
#[command(
    after_help = "Every option can also come from --config run.toml (same names, with _ for -); \
options given on the command line win. The resolved configuration is written to OUT/run.json.\n\n\
Examples:\n  metapeft adapt --model $MINILM --task clinc150/banking --method lora --shots 10 --out runs/clinc\n  \
metapeft adapt --task fortunes/science --method lora --shots 50 --steps 60 --out runs/fortunes\n\n\
Supported: decoders on language-modelling and prompt->completion tasks (perplexity; ROUGE of greedy \
generations) and on classification (--head verbalizer: labels scored by the LM; --head linear: a linear head on \
the last token); encoders on classification (mean-pooled linear head; accuracy, macro-F1) and token \
classification (per-token head on each word's first sub-token; entity-level F1). --method head trains the \
head only (a linear probe); --method full fine-tunes every weight but the embeddings."
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
    /// lora, tarp, adapter, ia3, prompt_tuning, prefix_tuning, bitfit, ln_tuning, full, or head
    /// (train the classification head only: a linear probe)
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
    /// Decoder classification: `verbalizer` (default; score each label's words by the LM) or
    /// `linear` (a linear head on the last non-pad token)
    #[arg(long)]
    pub head: Option<String>,
    /// Verbalizer words per label, `label=word,label=word` (default: per-task words, else the
    /// label with `_` as spaces)
    #[arg(long)]
    pub verbalizers: Option<String>,
    /// Evaluate every N steps (logged as eval_metric; plotted to eval.svg)
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// Stop after this many evaluations without improvement of the task's metric (needs
    /// --eval-every)
    #[arg(long)]
    pub patience: Option<usize>,
    /// The metric --eval-every logs and early stopping watches (default: the task's main one:
    /// perplexity, accuracy or f1; also e.g. macro_f1, nll, precision, recall)
    #[arg(long)]
    pub metric: Option<String>,
    /// End with the adapter/head of the best evaluation rather than the last step (needs
    /// --eval-every; default false)
    #[arg(long)]
    pub restore_best: Option<bool>,
    /// Write a checkpoint every N steps (default 10; always at the end)
    #[arg(long)]
    pub checkpoint_every: Option<usize>,
    /// Length bucketing of training batches (default true)
    #[arg(long)]
    pub bucket: Option<bool>,
    /// How the frozen base's matrices are stored: f32 (default); bf16 or f16 (half the memory,
    /// widened to f32 per product); gguf (the GGUF file's own quantized blocks, QLoRA-style:
    /// about the file's size); q8_0, q4_1 or q4_0 (requantize). Compute is f32 throughout. Not
    /// with `--method full`
    #[arg(long)]
    pub base_dtype: Option<String>,
    /// Activation checkpointing: keep only each layer's input and re-run the layer in
    /// the backward pass. Cuts training memory to about the weights plus one layer's activations,
    /// for about one more forward pass of time; for long sequences or large batches. Not with
    /// LoRA dropout (default false)
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub activation_checkpointing: Option<bool>,
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
            out,
            head,
            verbalizers,
            eval_every,
            patience,
            metric,
            restore_best,
            checkpoint_every,
            bucket,
            base_dtype,
            activation_checkpointing
        )
    }
}

/// Resolve `--config` and the command line.
fn resolve(a: &Args) -> Result<RunArgs> {
    let file = match &a.config {
        Some(p) => toml::from_str(
            &std::fs::read_to_string(p).with_context(|| format!("{}: cannot read", p.display()))?,
        )
        .with_context(|| format!("{}: bad run config", p.display()))?,
        None => RunArgs::default(),
    };
    Ok(a.run.clone().over(file))
}

pub fn run(a: Args) -> Result<()> {
    let r = resolve(&a)?;
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
    let (shots, seed, steps) = (
        r.shots.unwrap_or(16),
        r.seed.unwrap_or(0),
        r.steps.unwrap_or(50),
    );
    if r.patience.is_some() && r.eval_every.is_none() {
        bail!("--patience needs --eval-every");
    }
    if r.restore_best == Some(true) && r.eval_every.is_none() {
        bail!("--restore-best needs --eval-every");
    }
    if r.eval_every == Some(0) {
        bail!("--eval-every must be at least 1");
    }
    std::fs::create_dir_all(&out)?;
    io::write_atomic(
        &out.join("run.json"),
        serde_json::to_string_pretty(&r)?.as_bytes(),
    )?;
    let spec = match (&r.model, &r.from) {
        (None, Some(p)) => io::prepared::model_spec(p)?,
        _ => super::model_or_default(r.model.clone(), metapeft::assets::SMOLLM2)?,
    };
    let storage = BaseStorage::parse(r.base_dtype.as_deref().unwrap_or("f32"))?;
    if storage == BaseStorage::Packed {
        bail!(
            "--base-dtype packed is the inference layout (`generate --weights packed`); training \
             steps are faster on f32, which holds the same values"
        );
    }
    if storage != BaseStorage::Dense(DType::F32) && method == "full" {
        bail!(
            "--base-dtype {} stores a frozen base; --method full trains it: use f32",
            r.base_dtype.as_deref().unwrap_or("f32")
        );
    }
    let ck = storage.load(&spec)?;
    let td = setup::task_data(
        &task,
        &metapeft::assets::data_dir(),
        shots,
        seed,
        r.eval_limit.unwrap_or(200),
    )?;

    // The delta (or full fine-tuning, or nothing but the head).
    let (base, mut deltas, mut dp, adapter) = match method.as_str() {
        "full" => {
            let mut b = ck.params.clone();
            b.make_trainable(|n| {
                !n.ends_with("embed_tokens.weight") && !n.contains("word_embeddings")
            })?;
            (b, DeltaSet::none(), ParamStore::new(), None)
        }
        "head" | "none" => (ck.params.clone(), DeltaSet::none(), ParamStore::new(), None),
        _ => {
            let ad = match &r.from {
                // The meta-learned initialisation, trained from here like a fresh delta.
                Some(p) => {
                    let mut ad =
                        io::load_adapter(&io::prepared::adapter_dir(p), &ck.arch, &ck.params)?;
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
        }
    };
    let tams = match &r.from {
        Some(p) => attach_tams(p, &ck, &td, r.max_len.unwrap_or(256), &mut deltas, &mut dp)?,
        None => None,
    };
    let tc = TrainConfig {
        steps,
        lr: r.lr.unwrap_or(match method.as_str() {
            "full" => 5e-5,
            "head" | "none" => 1e-2,
            _ => 1e-3,
        }),
        schedule: Schedule::Linear { warmup: steps / 10 },
        optimizer: OptimizerConfig::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        },
        grad_clip: Some(1.0),
        grad_accum: r.grad_accum.unwrap_or(1),
        eval_every: r.eval_every,
        patience: r.patience,
        higher_is_better: false, // set from the task's metric
        checkpoint_every: r.checkpoint_every.unwrap_or(10),
        restore_best: r.restore_best.unwrap_or(false),
        halt_after: None,
    };
    let mut vars = base.vars();
    vars.extend(dp.vars());
    let s = Session {
        ck: &ck,
        td: &td,
        base: &base,
        deltas: &deltas,
        dp: &dp,
        r: &r,
        head_only: matches!(method.as_str(), "head" | "none"),
    };
    let report = s.execute(Mode::Adapt {
        tc: &tc,
        vars,
        out: &out,
        resume: a.resume,
    })?;
    match adapter {
        Some(ad) => io::save_adapter(
            &ad,
            &ck.arch,
            &super::peft::base_name(&ck),
            &out.join("adapter"),
            AdapterFormat::Native,
        )?,
        None if method == "full" => {
            io::hf_dir::write_parts(&ck.arch, &base, &ck.tokenizer, &out.join("model"))?
        }
        None => {}
    }
    if let Some((cfg, params, arch)) = &tams {
        save_tams(&out.join("tams"), cfg, params, &dp, arch, &task)?;
    }
    let log = out.join("metrics.jsonl");
    if log.is_file() {
        let metric = report["eval_metric"]
            .as_str()
            .unwrap_or("metric")
            .to_string();
        if let Err(e) = metapeft::train::plot::plot_run(&log, &out, &metric) {
            eprintln!("metapeft: warning: could not draw the curves: {e}");
        }
    }
    let full = serde_json::json!({"task": task, "method": method, "from": r.from,
                                  "tams_architecture": tams.as_ref().map(|t| t.2.to_string()), "shots": shots, "train_examples": td.train.len(),
                                  "eval_examples": td.eval.len(), "steps": steps, "seed": seed, "model": spec, "result": report});
    io::write_atomic(
        &out.join("report.json"),
        serde_json::to_string_pretty(&full)?.as_bytes(),
    )?;
    println!("{}", serde_json::to_string_pretty(&full["result"])?);
    Ok(())
}

/// Train then evaluate (adapt), or evaluate only (eval).
pub(crate) enum Mode<'a> {
    Adapt {
        tc: &'a TrainConfig,
        vars: Vec<(String, Var)>,
        out: &'a Path,
        resume: bool,
    },
    /// With the directory of a previous run whose head to use.
    Eval { head_dir: Option<&'a Path> },
}

/// Everything a run needs besides the mode; shared by `adapt` and `eval`.
pub(crate) struct Session<'a> {
    pub ck: &'a Checkpoint,
    pub td: &'a TaskData,
    pub base: &'a ParamStore,
    pub deltas: &'a DeltaSet,
    pub dp: &'a ParamStore,
    pub r: &'a RunArgs,
    /// `--method head`: nothing but the head trains.
    pub head_only: bool,
}

/// Metrics before and after training, or once (eval).
fn drive<O: Objective + Evaluate>(
    obj: &mut O,
    mode: Mode,
    metric: Option<&str>,
) -> Result<serde_json::Value> {
    let before = obj.metrics()?;
    let show = |m: &Metrics| {
        m.values
            .iter()
            .map(|(k, v)| format!("{k} {v:.4}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match mode {
        Mode::Eval { .. } => {
            eprintln!("{}", show(&before));
            Ok(
                serde_json::json!({"metric": before.primary, "value": before.value(), "metrics": before.values}),
            )
        }
        Mode::Adapt {
            tc,
            vars,
            out,
            resume,
        } => {
            eprintln!("before: {}", show(&before));
            let watched = metric.unwrap_or(before.primary).to_string();
            if !before.values.contains_key(&watched) {
                bail!(
                    "--metric {watched}: this task reports {}",
                    before.values.keys().cloned().collect::<Vec<_>>().join(", ")
                );
            }
            let tc = TrainConfig {
                higher_is_better: !lower_is_better(&watched),
                ..tc.clone()
            };
            let mut mon = Monitored {
                inner: obj,
                metric: watched.clone(),
            };
            let rep: TrainReport = train(&tc, vars, &mut mon, Some(out), resume)?;
            let after = obj.metrics()?;
            eprintln!("after:  {}", show(&after));
            Ok(
                serde_json::json!({"metric": before.primary, "before": before.value(), "after": after.value(),
                                  "metrics_before": before.values, "metrics_after": after.values, "train": rep,
                                  "eval_metric": watched}),
            )
        }
    }
}

impl Session<'_> {
    fn order(&self, lengths: Vec<usize>) -> BatchOrder {
        let n = lengths.len();
        let batch = self.r.batch_size.unwrap_or(8).min(n.max(1));
        let o = BatchOrder::new(
            n,
            batch,
            self.r.grad_accum.unwrap_or(1),
            self.r.seed.unwrap_or(0),
        );
        if self.r.bucket.unwrap_or(true) {
            o.with_lengths(lengths)
        } else {
            o
        }
    }

    fn warn_truncated(&self, n: usize, max_len: usize) {
        if n > 0 {
            eprintln!("metapeft: {n} examples truncated to {max_len} tokens");
        }
    }

    /// A head for `labels` classes on `hidden` units: loaded from `--head DIR` (eval), new and
    /// trainable (adapt), or an error when eval has none.
    fn head(&self, mode: &mut Mode, kind: &str, hidden: usize) -> Result<ParamStore> {
        let labels = &self.td.labels;
        match mode {
            Mode::Eval { head_dir: Some(d) } => Ok(load_head(d, kind, labels, hidden)?),
            Mode::Eval { head_dir: None } => bail!(
                "evaluating {} on `{}` needs a trained head: --head DIR (a previous `metapeft adapt` run's \
                 directory, with head.safetensors and labels.json)",
                self.ck.arch.name(),
                self.td.name
            ),
            Mode::Adapt { vars, .. } => {
                let mut h = match self.prepared_head(kind, hidden) {
                    Some(h) => h,
                    None => new_head(labels.len(), hidden, self.r.seed.unwrap_or(0))?,
                };
                h.make_trainable(|_| true)?;
                vars.extend(h.vars());
                Ok(h)
            }
        }
    }

    /// The head a `prepare --from` directory meta-learned for this kind of head, when it has
    /// one that scores exactly this task's labels; otherwise (a warning says why) none.
    fn prepared_head(&self, kind: &str, hidden: usize) -> Option<ParamStore> {
        let dir = metapeft::io::prepared::head_dir(self.r.from.as_ref()?);
        if !dir.join("head.safetensors").is_file() {
            return None;
        }
        match load_head(&dir, kind, &self.td.labels, hidden) {
            Ok(h) => {
                eprintln!("head: the prepared model's meta-learned {kind} head");
                Some(h)
            }
            Err(e) => {
                eprintln!(
                    "metapeft: warning: not using the prepared head ({e}); starting a fresh one"
                );
                None
            }
        }
    }

    pub(crate) fn execute(&self, mut mode: Mode) -> Result<serde_json::Value> {
        let (ck, td, r) = (self.ck, self.td, self.r);
        let max_len = r.max_len.unwrap_or(256);
        let out_dir = match &mode {
            Mode::Adapt { out, .. } => Some(out.to_path_buf()),
            Mode::Eval { .. } => None,
        };
        let needs_head = matches!(
            td.kind,
            TaskKind::Classification | TaskKind::TokenClassification
        );
        if let (Mode::Eval { head_dir: Some(d) }, false) = (&mode, needs_head) {
            bail!(
                "--head {} is for classification tasks; `{}` is a {:?} task",
                d.display(),
                td.name,
                td.kind
            );
        }
        if self.head_only && !needs_head {
            bail!(
                "--method head trains a classification head only; `{}` is a {:?} task",
                td.name,
                td.kind
            );
        }
        if needs_head && td.labels.len() < 2 {
            bail!(
                "task `{}` has {} label(s); classification needs at least 2",
                td.name,
                td.labels.len()
            );
        }
        let mut result = match (&ck.arch, td.kind) {
            (Arch::Llama(cfg), TaskKind::LanguageModeling | TaskKind::PromptCompletion) => {
                let m = Llama::new(cfg.clone(), &Device::Cpu)?
                    .with_activation_checkpointing(r.activation_checkpointing.unwrap_or(false));
                let (tr, t1) = batch::sequences(&ck.tokenizer, &td.train, max_len)?;
                let (ev, t2) = batch::sequences(&ck.tokenizer, &td.eval, max_len)?;
                self.warn_truncated(t1 + t2, max_len);
                let pad = ck.tokenizer.pad_id.or(ck.tokenizer.eos_ids.first().copied()).unwrap_or(0);
                let lengths = tr.iter().map(|s| s.ids.len()).collect();
                let mut obj = DecoderLm {
                    model: &m,
                    base: self.base,
                    deltas: self.deltas,
                    params: self.dp,
                    order: self.order(lengths),
                    train: tr,
                    eval: ev,
                    pad,
                    last_tokens: 0,
                };
                let n_gen = if td.kind == TaskKind::PromptCompletion { r.generate_eval.unwrap_or(30) } else { 0 };
                let max_new = r.max_new_tokens.unwrap_or(64);
                let gen = |tag: &str| -> Result<[f64; 3]> {
                    let log = out_dir.as_ref().map(|d| d.join(format!("generations-{tag}.jsonl")));
                    Ok(rouge_eval(&m, &ck.tokenizer, self.base, self.deltas, self.dp, &td.eval, n_gen, max_new, log.as_deref())?)
                };
                let rouge_json = |x: [f64; 3]| serde_json::json!({"rouge1": x[0], "rouge2": x[1], "rougeL": x[2]});
                let is_eval = matches!(mode, Mode::Eval { .. });
                let rb = if n_gen > 0 { Some(gen(if is_eval { "eval" } else { "before" })?) } else { None };
                let mut j = drive(&mut obj, mode, r.metric.as_deref())?;
                if let Some(rb) = rb {
                    j["rouge_examples"] = n_gen.min(td.eval.len()).into();
                    if is_eval {
                        j["rouge"] = rouge_json(rb);
                    } else {
                        let ra = gen("after")?;
                        eprintln!("ROUGE-L F1 before {:.4}, after {:.4} ({n_gen} generated)", rb[2], ra[2]);
                        j["rouge_before"] = rouge_json(rb);
                        j["rouge_after"] = rouge_json(ra);
                    }
                }
                j
            }
            (Arch::Llama(cfg), TaskKind::Classification) => {
                let m = Llama::new(cfg.clone(), &Device::Cpu)?
                    .with_activation_checkpointing(r.activation_checkpointing.unwrap_or(false));
                let template = |t: &str, p: Option<&str>| setup::classification_prompt(&td.name, t, p);
                let (tr, t1) = batch::decoder_items(&ck.tokenizer, &td.train, &td.labels, &template, max_len)?;
                let (ev, t2) = batch::decoder_items(&ck.tokenizer, &td.eval, &td.labels, &template, max_len)?;
                self.warn_truncated(t1 + t2, max_len);
                let pad = ck.tokenizer.pad_id.or(ck.tokenizer.eos_ids.first().copied()).unwrap_or(0);
                let kind = match (&mode, r.head.as_deref()) {
                    (Mode::Eval { head_dir }, _) => if head_dir.is_some() { "linear" } else { "verbalizer" },
                    (_, None | Some("verbalizer")) => "verbalizer",
                    (_, Some("linear")) => "linear",
                    (_, Some(h)) => bail!("--head must be `linear` or `verbalizer`, not `{h}`"),
                };
                let custom = setup::parse_verbalizers(r.verbalizers.as_deref().unwrap_or(""))?;
                let verbs = setup::verbalizer_ids(&ck.tokenizer, &td.name, &td.labels, &custom)?;
                if kind == "verbalizer" && self.head_only {
                    bail!("--method head with --head verbalizer has nothing to train (use --head linear)");
                }
                let head_store = if kind == "linear" { Some(self.head(&mut mode, HEAD_DECODER_LAST, cfg.hidden_size)?) } else { None };
                let lengths = tr.iter().map(|i| i.ids.len()).collect();
                let mut obj = DecoderClassifier {
                    model: &m,
                    base: self.base,
                    deltas: self.deltas,
                    params: self.dp,
                    head: match &head_store {
                        Some(h) => DecoderHead::Linear(h),
                        None => DecoderHead::Verbalizer(verbs.clone()),
                    },
                    order: self.order(lengths),
                    train: tr,
                    eval: ev,
                    pad,
                };
                let mut j = drive(&mut obj, mode, r.metric.as_deref())?;
                j["head"] = kind.into();
                if kind == "verbalizer" {
                    j["verbalizers"] = td.labels.iter().map(|l| setup::verbalizer(&td.name, l, &custom)).collect::<Vec<_>>().into();
                }
                if let (Some(h), Some(d)) = (&head_store, &out_dir) {
                    save_head(h, &td.labels, HEAD_DECODER_LAST, d)?;
                }
                j
            }
            (Arch::Bert(cfg), TaskKind::Classification) => {
                let m = Bert::new(cfg.clone())
                    .with_activation_checkpointing(r.activation_checkpointing.unwrap_or(false));
                let (tr, t1) = batch::encoder_items(&ck.tokenizer, &td.train, &td.labels, max_len)?;
                let (ev, t2) = batch::encoder_items(&ck.tokenizer, &td.eval, &td.labels, max_len)?;
                self.warn_truncated(t1 + t2, max_len);
                let head = self.head(&mut mode, HEAD_ENCODER_POOLED, cfg.hidden_size)?;
                let lengths = tr.iter().map(|i| i.ids.len()).collect();
                let mut obj = EncoderClassifier {
                    model: &m,
                    base: self.base,
                    deltas: self.deltas,
                    params: self.dp,
                    head: &head,
                    order: self.order(lengths),
                    train: tr,
                    eval: ev,
                    pad: cfg.pad_token_id,
                };
                let j = drive(&mut obj, mode, r.metric.as_deref())?;
                if let Some(d) = &out_dir {
                    save_head(&head, &td.labels, HEAD_ENCODER_POOLED, d)?;
                }
                j
            }
            (Arch::Bert(cfg), TaskKind::TokenClassification) => {
                let m = Bert::new(cfg.clone())
                    .with_activation_checkpointing(r.activation_checkpointing.unwrap_or(false));
                let (tr, t1) = batch::tagged_items(&ck.tokenizer, &td.train, &td.labels, max_len)?;
                let (ev, t2) = batch::tagged_items(&ck.tokenizer, &td.eval, &td.labels, max_len)?;
                self.warn_truncated(t1 + t2, max_len);
                let head = self.head(&mut mode, HEAD_TOKEN, cfg.hidden_size)?;
                let lengths = tr.iter().map(|i| i.ids.len()).collect();
                let mut obj = EncoderTagger {
                    model: &m,
                    base: self.base,
                    deltas: self.deltas,
                    params: self.dp,
                    head: &head,
                    tags: td.labels.clone(),
                    order: self.order(lengths),
                    train: tr,
                    eval: ev,
                    pad: cfg.pad_token_id,
                };
                let j = drive(&mut obj, mode, r.metric.as_deref())?;
                if let Some(d) = &out_dir {
                    save_head(&head, &td.labels, HEAD_TOKEN, d)?;
                }
                j
            }
            (arch, kind) => bail!(
                "a {} model on a {kind:?} task is not supported (decoders: language modelling, \
                 prompt->completion, classification; encoders: classification, token classification)",
                arch.name()
            ),
        };
        if needs_head {
            result["labels"] = td.labels.len().into();
        }
        Ok(result)
    }
}

/// A prepared model with TAMS: the controller picks this task's cell from the training examples;
/// the cell joins the delta (its weights train, its architecture stays fixed).
fn attach_tams(
    from: &Path,
    ck: &Checkpoint,
    td: &TaskData,
    max_len: usize,
    deltas: &mut DeltaSet,
    dp: &mut ParamStore,
) -> Result<Option<(TamsConfig, ParamStore, Architecture)>> {
    let dir = from.join("tams");
    let cfg_path = dir.join("tams_config.json");
    if !cfg_path.is_file() {
        return Ok(None);
    }
    let cfg: TamsConfig = serde_json::from_str(&std::fs::read_to_string(&cfg_path)?)
        .with_context(|| format!("{}: bad TAMS config", cfg_path.display()))?;
    let mut params = ParamStore::new();
    for (n, t) in io::load_safetensors(&dir.join("tams.safetensors"))? {
        params.insert_trainable(n, Var::from_tensor(&t)?);
    }
    let dims = ModelDims::of(&ck.arch);
    let (cell, controller) = cfg.build(dims, &params)?;
    // The support set's tokens, as meta-training saw them: language-model sequences for text
    // tasks, each input with its special tokens for classification and tagging (encoders).
    use metapeft::data::Content;
    let text_task = td.train.iter().all(|ex| {
        matches!(
            ex.content,
            Content::Text { .. } | Content::PromptCompletion { .. }
        )
    });
    let ids: Vec<u32> = if text_task {
        let (seqs, _) = metapeft::data::batch::sequences(&ck.tokenizer, &td.train, max_len)?;
        seqs.iter().flat_map(|s| s.ids.iter().copied()).collect()
    } else {
        let mut ids = vec![];
        for ex in &td.train {
            let text = match &ex.content {
                Content::Labeled {
                    text,
                    pair: Some(p),
                    ..
                } => format!("{text} {p}"),
                Content::Labeled { text, .. } => text.clone(),
                Content::Tagged { tokens, .. } => tokens.join(" "),
                _ => continue,
            };
            let mut e = ck.tokenizer.encode(&text, true)?;
            e.truncate(max_len);
            ids.extend(e);
        }
        ids
    };
    let n = ids.len();
    let emb = tams::task_embedding(&ck.params, &Tensor::from_vec(ids, n, &Device::Cpu)?, None)?;
    let soft = controller.arch_weights(&emb, &params, tams::ArchMode::Soft, None)?;
    let arch = Architecture::from_weights(&soft)?;
    eprintln!("TAMS cell for this task: {arch}");
    for (name, p) in params.iter() {
        if !name.starts_with("tams.controller.") {
            dp.insert(name, p.clone());
        }
    }
    dp.insert_frozen(tams::ARCH, arch.one_hot(DType::F32, &Device::Cpu)?);
    deltas.push(cell);
    Ok(Some((cfg, params, arch)))
}

/// The adapted cell weights (from `dp`), the controller, the config and the chosen architecture.
fn save_tams(
    dir: &Path,
    cfg: &TamsConfig,
    params: &ParamStore,
    dp: &ParamStore,
    arch: &Architecture,
    task: &str,
) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    io::write_atomic(
        &dir.join("tams_config.json"),
        serde_json::to_string_pretty(cfg)?.as_bytes(),
    )?;
    let t: std::collections::HashMap<String, Tensor> = params
        .iter()
        .map(|(n, p)| {
            let v = dp.get_opt(n).unwrap_or(p.tensor());
            (n.to_string(), v.detach())
        })
        .collect();
    io::save_safetensors(&t, &dir.join("tams.safetensors"))?;
    let archs = std::collections::BTreeMap::from([(task.to_string(), *arch)]);
    tams::write_architectures(dir, &archs)?;
    Ok(())
}
