use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::Device;
use metapeft::model;
use metapeft::params::ParamStore;
use metapeft::peft::DeltaSet;
use metapeft::train::setup;

use super::adapt::{Mode, RunArgs, Session};

#[derive(clap::Args)]
#[command(
    after_help = "Evaluates on the same seeded held-out examples as `adapt` (same --seed and \
--eval-limit), with the same metrics: perplexity (and ROUGE with --generate-eval) for language modelling \
and prompt->completion, accuracy and macro-F1 for classification, entity-level F1 for token classification.\n\n\
Examples:\n  metapeft eval --model $MINILM --adapter runs/clinc/adapter --head runs/clinc --task clinc150/banking\n  \
metapeft eval --task sst2 --eval-limit 200            # SmolLM2, zero-shot, label verbalizers\n  \
metapeft eval --model runs/full/model --head runs/full --task clinc150/banking"
)]
pub struct Args {
    /// Base model (default: SmolLM2-135M-Instruct); a full fine-tuning run's OUT/model works too
    #[arg(long)]
    model: Option<String>,
    /// An adapter: a PEFT or metapeft directory (e.g. OUT/adapter of `adapt`), or a GGUF LoRA
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// A previous `adapt` run's directory whose classification head (head.safetensors,
    /// labels.json) to use; its labels must be the task's. Decoders without it use verbalizers.
    #[arg(long)]
    head: Option<PathBuf>,
    #[arg(long)]
    task: String,
    /// Evaluate on at most this many examples (a seeded random subset, as `adapt` does)
    #[arg(long, default_value_t = 200)]
    eval_limit: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Maximum tokens per sequence
    #[arg(long, default_value_t = 256)]
    max_len: usize,
    /// Decoder classification: verbalizer words, `label=word,...`
    #[arg(long)]
    verbalizers: Option<String>,
    /// Prompt->completion tasks: also generate for this many examples and report ROUGE
    #[arg(long, default_value_t = 0)]
    generate_eval: usize,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Also write the JSON result to this file
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    let spec = super::model_or_default(a.model.clone(), metapeft::assets::SMOLLM2)?;
    let ck = model::load(&spec, &Device::Cpu)?;
    let td = setup::task_data(
        &a.task,
        &metapeft::assets::data_dir(),
        0,
        a.seed,
        a.eval_limit,
    )?;
    let (deltas, dp) = match &a.adapter {
        Some(path) => {
            let ad = super::export::load_adapter(path, &ck)?;
            (ad.attach(&ck.arch, &ck.params)?, ad.params)
        }
        None => (DeltaSet::none(), ParamStore::new()),
    };
    let r = RunArgs {
        max_len: Some(a.max_len),
        seed: Some(a.seed),
        verbalizers: a.verbalizers.clone(),
        generate_eval: Some(a.generate_eval),
        max_new_tokens: Some(a.max_new_tokens),
        ..Default::default()
    };
    let s = Session {
        ck: &ck,
        td: &td,
        base: &ck.params,
        deltas: &deltas,
        dp: &dp,
        r: &r,
        head_only: false,
    };
    let result = s.execute(Mode::Eval {
        head_dir: a.head.as_deref(),
    })?;
    let full = serde_json::json!({"task": a.task, "model": spec, "adapter": a.adapter, "head": a.head,
                                  "eval_split": td.eval_split, "eval_examples": td.eval.len(), "seed": a.seed,
                                  "result": result});
    let text = serde_json::to_string_pretty(&full)?;
    if let Some(p) = &a.out {
        metapeft::io::write_atomic(p, text.as_bytes())
            .with_context(|| format!("{}: cannot write", p.display()))?;
    }
    println!("{text}");
    Ok(())
}
