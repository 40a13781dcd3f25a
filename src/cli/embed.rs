use anyhow::{bail, Result};
use candle_core::Device;
use metapeft::model::{self, bert::cosine, Arch, Bert};

#[derive(clap::Args)]
#[command(
    after_help = "Example:\n  metapeft embed \"A man is eating food.\" \"A man is eating a piece of bread.\""
)]
pub struct Args {
    /// A Hugging Face encoder directory or hub id (default: all-MiniLM-L6-v2)
    #[arg(long)]
    model: Option<String>,
    /// The texts to embed
    #[arg(required = true)]
    texts: Vec<String>,
    /// Print {"embeddings": [[...], ...]} as JSON
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let spec = super::model_or_default(a.model, metapeft::assets::MINILM)?;
    let ck = model::load(&spec, &Device::Cpu)?;
    let Arch::Bert(cfg) = &ck.arch else {
        bail!("{spec} is a decoder; `embed` needs an encoder such as all-MiniLM-L6-v2");
    };
    let bert = Bert::new(cfg.clone());
    let e = bert.embed_texts(&ck.params, &ck.tokenizer, &a.texts)?;
    if a.json {
        println!("{}", serde_json::json!({ "embeddings": e }));
        return Ok(());
    }
    for (t, v) in a.texts.iter().zip(&e) {
        let head: Vec<String> = v.iter().take(6).map(|x| format!("{x:+.4}")).collect();
        println!("{:?}: [{}, ...] ({} dims)", t, head.join(", "), v.len());
    }
    if e.len() > 1 {
        println!("cosine similarities:");
        for i in 0..e.len() {
            for j in i + 1..e.len() {
                println!("  {i} vs {j}: {:.4}", cosine(&e[i], &e[j]));
            }
        }
    }
    Ok(())
}
