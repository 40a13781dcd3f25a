use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Result;
use candle_core::Device;
use metapeft::io::{self, AdapterFormat};
use metapeft::model;
use metapeft::peft::config::{config_from_file, default_config, METHODS};
use metapeft::peft::DeltaConfig;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    action: Action,
}

#[derive(clap::Args, Clone)]
struct MethodArgs {
    /// A GGUF file, Hugging Face directory or hub id (default: SmolLM2-135M-Instruct)
    #[arg(long)]
    model: Option<String>,
    /// lora, ia3, prompt_tuning, prefix_tuning, bitfit or ln_tuning (default settings)
    #[arg(long, default_value = "lora")]
    method: String,
    /// A JSON or TOML delta config (`method = "lora"`, `r = 8`, `lora_alpha = 16`,
    /// `target_modules = ["q_proj", "v_proj"]`, ...); overrides --method
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(clap::Subcommand)]
enum Action {
    /// Trainable vs total parameters of a method on a model, per site
    Summary(MethodArgs),
    /// Write a freshly initialised adapter (seeded), e.g. to try the export path
    Init {
        #[command(flatten)]
        m: MethodArgs,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_enum, default_value = "native")]
        format: AdapterFormat,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

fn resolve(m: &MethodArgs, arch: &model::Arch) -> Result<DeltaConfig> {
    Ok(match &m.config {
        Some(p) => config_from_file(p)?,
        None => default_config(&m.method, arch)?,
    })
}

pub fn run(a: Args) -> Result<()> {
    match a.action {
        Action::Summary(m) => {
            let spec = super::model_or_default(m.model.clone(), metapeft::assets::SMOLLM2)?;
            let ck = model::load(&spec, &Device::Cpu)?;
            let cfg = resolve(&m, &ck.arch)?;
            let adapter = cfg.init(&ck.arch, &ck.params, 0)?;
            let (trainable, total) = adapter.summary(&ck.params);
            println!("model   {spec}");
            println!("method  {} {}", cfg.method(), serde_json::to_string(&cfg)?);
            // Group by site kind: the module name with layer indices removed.
            let mut sites: BTreeMap<String, (usize, usize)> = BTreeMap::new();
            for (name, p) in adapter.params.iter() {
                let site: Vec<&str> = name
                    .split('.')
                    .filter(|s| s.parse::<usize>().is_err())
                    .collect();
                let e = sites.entry(site.join(".")).or_default();
                e.0 += 1;
                e.1 += p.tensor().elem_count();
            }
            println!(
                "{:<60} {:>7} {:>12}",
                "site (all layers)", "tensors", "parameters"
            );
            for (s, (n, c)) in &sites {
                println!("{s:<60} {n:>7} {c:>12}");
            }
            println!(
                "trainable {trainable} of {total} base parameters ({:.4}%); methods: {}",
                100.0 * trainable as f64 / total as f64,
                METHODS.join(", ")
            );
        }
        Action::Init {
            m,
            out,
            format,
            seed,
        } => {
            let spec = super::model_or_default(m.model.clone(), metapeft::assets::SMOLLM2)?;
            let ck = model::load(&spec, &Device::Cpu)?;
            let cfg = resolve(&m, &ck.arch)?;
            let adapter = cfg.init(&ck.arch, &ck.params, seed)?;
            io::save_adapter(&adapter, &ck.arch, &base_name(&ck), &out, format)?;
            println!(
                "wrote {} adapter ({} parameters) to {}",
                cfg.method(),
                adapter.params.num_params(),
                out.display()
            );
        }
    }
    Ok(())
}

/// How an adapter names its base model: the checkpoint's file or directory name.
pub fn base_name(ck: &model::Checkpoint) -> String {
    ck.path
        .file_name()
        .map(|n| n.to_string_lossy().trim_end_matches(".gguf").to_string())
        .unwrap_or_else(|| ck.path.display().to_string())
}
