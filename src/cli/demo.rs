use anyhow::Result;
use candle_core::Device;
use metapeft::assets;
use metapeft::generate::{generate, GenerateOptions};
use metapeft::model::{self, bert::cosine, Arch, Bert, ChatMessage, Llama};
use metapeft::params::ParamStore;
use metapeft::peft::DeltaSet;

#[derive(clap::Args)]
pub struct Args {
    /// The question to ask the chat model
    #[arg(long, default_value = "What is the capital of France?")]
    question: String,
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
    println!(
        "\nNot built yet: adaptation (adapt), meta-learning (prepare), export; see the README."
    );
    Ok(())
}
