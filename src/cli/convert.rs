use std::path::PathBuf;

use anyhow::Result;
use candle_core::Device;
use metapeft::model;

#[derive(clap::Args)]
#[command(
    after_help = "Example: metapeft convert --out smollm2-hf   (then load it with transformers or --model smollm2-hf)"
)]
pub struct Args {
    /// A GGUF file or Hugging Face directory (default: SmolLM2-135M-Instruct)
    #[arg(long)]
    model: Option<String>,
    /// The output directory (created if missing)
    #[arg(long)]
    out: PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    let spec = super::model_or_default(a.model, metapeft::assets::SMOLLM2)?;
    let ck = model::load(&spec, &Device::Cpu)?;
    metapeft::io::hf_dir::write_hf_dir(&ck, &a.out)?;
    println!(
        "wrote {} (f32 weights, config.json, tokenizer)",
        a.out.display()
    );
    Ok(())
}
