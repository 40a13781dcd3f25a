use std::path::{Path, PathBuf};

use anyhow::Result;
use candle_core::Device;
use metapeft::io::{self, AdapterFormat};
use metapeft::model::{self, Checkpoint};
use metapeft::peft::Adapter;

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  metapeft export --adapter run/adapter --format peft --out hf-adapter\n  \
metapeft export --adapter run/adapter --format gguf-lora --out lora.gguf   # llama.cpp --lora\n  \
metapeft export --adapter run/adapter --format merged --out merged-model   # base + delta as one HF model"
)]
pub struct Args {
    /// The adapter: a PEFT or metapeft directory, or a GGUF LoRA file
    #[arg(long)]
    adapter: PathBuf,
    /// The base model the adapter belongs to (default: SmolLM2-135M-Instruct)
    #[arg(long)]
    model: Option<String>,
    #[arg(long, value_enum)]
    format: ExportFormat,
    /// Output directory (peft, native, merged) or file (gguf-lora)
    #[arg(long)]
    out: PathBuf,
    /// Export the delta even though the adapted model also has a TAMS cell (MLtD), which none of
    /// the formats can hold: the exported model then differs from the adapted one
    #[arg(long)]
    drop_tams: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ExportFormat {
    /// Hugging Face PEFT adapter directory (LoRA, IA3, prompt and prefix tuning)
    Peft,
    /// metapeft's own adapter directory (every method)
    Native,
    /// GGUF LoRA for llama.cpp's --lora
    GgufLora,
    /// The base model with the adapter merged in, as a Hugging Face directory
    Merged,
}

/// Load an adapter from a PEFT/metapeft directory or a GGUF LoRA file.
pub fn load_adapter(path: &Path, ck: &Checkpoint) -> Result<Adapter> {
    if io::prepared::is_prepared(path) {
        return Ok(io::load_adapter(
            &io::prepared::adapter_dir(path),
            &ck.arch,
            &ck.params,
        )?);
    }
    if path.is_file() && path.extension().is_some_and(|e| e == "gguf") {
        return Ok(io::gguf_lora::read(path, &ck.arch, &ck.params)?);
    }
    Ok(io::load_adapter(path, &ck.arch, &ck.params)?)
}

/// The TAMS cell that belongs with an adapter: `tams/` in a prepared or `adapt` run directory
/// given directly, or next to an `adapter/` directory inside one.
fn tams_beside(adapter: &Path) -> Option<PathBuf> {
    let mut candidates = vec![adapter.join("tams")];
    if adapter.file_name().is_some_and(|n| n == "adapter") {
        if let Some(parent) = adapter.parent() {
            candidates.push(parent.join("tams"));
        }
    }
    candidates.into_iter().find(|d| d.is_dir())
}

pub fn run(a: Args) -> Result<()> {
    if let Some(tams) = tams_beside(&a.adapter) {
        if !a.drop_tams {
            anyhow::bail!(
                "{} has a TAMS cell ({}) in every FFN residual, chosen per task by MLtD's \
                 controller. PEFT adapters, GGUF LoRA and merged weights cannot express it, so \
                 the exported model would compute something else. Keep using it with metapeft \
                 (`adapt --from`, `eval`), or pass --drop-tams to export the delta alone.",
                a.adapter.display(),
                tams.display()
            );
        }
        eprintln!(
            "warning: exporting without the TAMS cell in {} (--drop-tams): the exported model \
             differs from the adapted one",
            tams.display()
        );
    }
    let spec = super::model_or_default(a.model, metapeft::assets::SMOLLM2)?;
    let ck = model::load(&spec, &Device::Cpu)?;
    let adapter = load_adapter(&a.adapter, &ck)?;
    let base = super::peft::base_name(&ck);
    match a.format {
        ExportFormat::Peft => {
            io::save_adapter(&adapter, &ck.arch, &base, &a.out, AdapterFormat::Peft)?
        }
        ExportFormat::Native => {
            io::save_adapter(&adapter, &ck.arch, &base, &a.out, AdapterFormat::Native)?
        }
        ExportFormat::GgufLora => io::gguf_lora::write(&adapter, &ck.arch, &ck.params, &a.out)?,
        ExportFormat::Merged => {
            let deltas = adapter.attach(&ck.arch, &ck.params)?;
            io::merged::write_merged(&ck, &deltas, &adapter.params, &a.out)?;
        }
    }
    println!("wrote {} ({})", a.out.display(), adapter.config.method());
    Ok(())
}
