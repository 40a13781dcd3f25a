//! Print the last-position logits (first N) of a model, optionally with an adapter, as JSON for
//! `scripts/reference/check_metapeft_peft_export.py`:
//!
//!     cargo run --release --example dump_logits -- MODEL ADAPTER_DIR N "prompt" ["prompt" ...]
//!
//! Use `-` as ADAPTER_DIR for none.

use candle_core::{Device, Tensor};
use metapeft::model::{self, Arch, KvCache, Llama};
use metapeft::params::ParamStore;
use metapeft::peft::DeltaSet;

fn main() -> anyhow::Result<()> {
    metapeft::runtime::configure_threads();
    let args: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(
        args.len() >= 4,
        "usage: dump_logits MODEL ADAPTER_DIR|- N PROMPT..."
    );
    let ck = model::load(&args[0], &Device::Cpu)?;
    let Arch::Llama(cfg) = &ck.arch else {
        anyhow::bail!("needs a decoder")
    };
    let m = Llama::new(cfg.clone(), &Device::Cpu)?;
    let (deltas, dp) = if args[1] == "-" {
        (DeltaSet::none(), ParamStore::new())
    } else {
        let a = metapeft::io::load_adapter(std::path::Path::new(&args[1]), &ck.arch, &ck.params)?;
        (a.attach(&ck.arch, &ck.params)?, a.params)
    };
    let n: usize = args[2].parse()?;
    let mut prompts = vec![];
    for p in &args[3..] {
        let ids = ck.tokenizer.encode(p, false)?;
        let t = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        let mut cache = KvCache::new(cfg.num_hidden_layers);
        let l: Vec<f32> = m
            .forward_last(&ck.params, &deltas, &dp, &t, &mut cache)?
            .squeeze(0)?
            .to_vec1()?;
        prompts.push(serde_json::json!({"prompt_ids": ids, "last_logits": &l[..n.min(l.len())]}));
    }
    println!("{}", serde_json::json!({ "prompts": prompts }));
    Ok(())
}
