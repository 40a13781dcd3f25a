use anyhow::Result;
use candle_core::Device;
use metapeft::model::{self, Arch};

#[derive(clap::Args)]
pub struct Args {
    /// A GGUF file, a Hugging Face model directory, or a hub id (default: SmolLM2-135M-Instruct)
    model: Option<String>,
    /// Print the summary as JSON
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let spec = super::model_or_default(a.model, metapeft::assets::SMOLLM2)?;
    let ck = model::load(&spec, &Device::Cpu)?;
    let (layers, hidden, heads, kv, ffn, ctx) = match &ck.arch {
        Arch::Llama(c) => (
            c.num_hidden_layers,
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.intermediate_size,
            c.max_position_embeddings,
        ),
        Arch::Bert(c) => (
            c.num_hidden_layers,
            c.hidden_size,
            c.num_attention_heads,
            c.num_attention_heads,
            c.intermediate_size,
            c.max_position_embeddings,
        ),
    };
    let params = ck.params.num_params();
    let summary = serde_json::json!({
        "path": ck.path.display().to_string(),
        "architecture": ck.arch.name(),
        "layers": layers,
        "hidden_size": hidden,
        "attention_heads": heads,
        "kv_heads": kv,
        "ffn_size": ffn,
        "max_positions": ctx,
        "parameters": params,
        "storage": ck.storage,
        "compute_dtype": "f32",
        "vocab_size": ck.tokenizer.vocab_size(),
        "tied_embeddings": matches!(&ck.arch, Arch::Llama(c) if c.tie_word_embeddings),
        "chat_template": ck.tokenizer.chat_format().map(|_| "ChatML").or(ck.tokenizer.chat_template.as_ref().map(|_| "unrecognised")),
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(());
    }
    println!("model         {}", ck.path.display());
    println!("architecture  {}", ck.arch.name());
    println!("layers        {layers} (hidden {hidden}, ffn {ffn}, heads {heads}, kv heads {kv})");
    println!("parameters    {params} ({:.1} M)", params as f64 / 1e6);
    println!("stored as     {}", ck.storage);
    println!("computes in   f32");
    println!("vocabulary    {}", ck.tokenizer.vocab_size());
    println!("context       {ctx} positions");
    if let Some(t) = summary["chat_template"].as_str() {
        println!("chat template {t}");
    }
    Ok(())
}
