use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{Device, Var};
use metapeft::data::family;
use metapeft::data::TaskKind;
use metapeft::io::{self, prepared, AdapterFormat};
use metapeft::meta::tams::{self, TamsConfig};
use metapeft::meta::trainer::task_architectures;
use metapeft::meta::trainer::{Net, TagHead};
use metapeft::meta::{meta_train, Algo, MetaConfig, MetaModel, TamsParts};
use metapeft::model::{self, Arch, Bert, Llama};
use metapeft::params::ParamStore;
use metapeft::peft::config::ModelDims;
use metapeft::peft::config::{config_from_file, default_config};
use metapeft::peft::Adapter;
use metapeft::train::objectives::{new_head, save_head, HEAD_TOKEN};
use serde::{Deserialize, Serialize};

#[derive(clap::Args)]
#[command(
    after_help = "Every option can also come from --config prepare.toml (same names, with _ for -); \
options given on the command line win. OUT gets prepared.json, adapter/ (the meta-learned delta \
initialisation), model/ when the base was trained, meta-metrics.jsonl and a checkpoint.\n\n\
Algorithms: fomaml, maml (exact second order), maml-hf (Hessian-free second order), reptile, anil \
(inner loop on the last layer's delta), meta-sgd (learned inner rates), mltd (TARP delta, first order), \
prime (inner loop trains a fresh delta, outer loop the base), multitask (no inner loop; baseline).\n\n\
Families: `metapeft tasks --families`. Decoders take language-modelling and prompt->completion \
families; encoders (e.g. all-MiniLM-L6-v2) take classification families as N-way episodes (--n-way, with \
--support/--query examples per class) with a fresh linear head per episode, and token-classification families \
(ner-wikiann) as tagging episodes whose per-token head is meta-learned too (saved in OUT/head/, the starting \
head of `adapt --from`). Then adapt from the prepared model:\n  \
metapeft prepare --family lm-domains --algo fomaml --meta-steps 40 --out runs/prep\n  \
metapeft adapt --from runs/prep --task fortunes/science --shots 50 --out runs/science"
)]
pub struct Args {
    /// A TOML file with any of the options below
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    run: PrepareArgs,
    /// Continue from the checkpoint in --out
    #[arg(long)]
    resume: bool,
}

#[derive(clap::Args, Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrepareArgs {
    /// Base model (default: SmolLM2-135M-Instruct)
    #[arg(long)]
    pub model: Option<String>,
    /// A task family (default: lm-domains for decoders, intent-clinc for encoders)
    #[arg(long)]
    pub family: Option<String>,
    /// fomaml, maml, maml-hf, reptile, anil, meta-sgd, mltd, prime, multitask (default: fomaml)
    #[arg(long)]
    pub algo: Option<String>,
    /// The delta: lora, tarp, adapter, ia3, ... (default: tarp for mltd, else lora)
    #[arg(long)]
    pub method: Option<String>,
    /// A JSON/TOML delta config file instead of the method's defaults
    #[arg(long)]
    pub method_config: Option<PathBuf>,
    /// Inner-loop SGD steps per episode (default 2)
    #[arg(long)]
    pub inner_steps: Option<usize>,
    /// Inner-loop SGD rate (default 0.3)
    #[arg(long)]
    pub inner_lr: Option<f64>,
    /// Episodes per outer step (default 4)
    #[arg(long)]
    pub meta_batch: Option<usize>,
    /// Outer steps (default 100)
    #[arg(long)]
    pub meta_steps: Option<usize>,
    /// Outer AdamW rate (default 1e-3; 1e-5 when the base is trained)
    #[arg(long)]
    pub outer_lr: Option<f64>,
    /// Support examples per episode (default 8)
    #[arg(long)]
    pub support: Option<usize>,
    /// Query examples per episode (default 8)
    #[arg(long)]
    pub query: Option<usize>,
    /// Support sequences per inner step (default 4)
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Maximum tokens per sequence (default 128)
    #[arg(long)]
    pub max_len: Option<usize>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Meta-validate every N outer steps (default 25)
    #[arg(long)]
    pub valid_every: Option<usize>,
    /// Classes per episode of a classification family (default 5)
    #[arg(long)]
    pub n_way: Option<usize>,
    /// Also train the base model in the outer loop (priming always does)
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub train_base: Option<bool>,
    /// TAMS: a controller picks a DARTS cell in every FFN residual per task (MLtD's model search)
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub tams: Option<bool>,
    /// A JSON/TOML TAMS config (reduced_dim, controller_hidden, gumbel_temperature, layers, hard)
    #[arg(long)]
    pub tams_config: Option<PathBuf>,
    /// Activation checkpointing (first-order algorithms): keep only each layer's input
    /// and re-run the layer in the backward pass; much less memory per episode for about one more
    /// forward pass of time. Exact second-order MAML keeps its full graph regardless
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub activation_checkpointing: Option<bool>,
    #[arg(long)]
    pub out: Option<PathBuf>,
}

impl PrepareArgs {
    fn over(self, file: PrepareArgs) -> PrepareArgs {
        macro_rules! pick {
            ($($f:ident),*) => { PrepareArgs { $($f: self.$f.or(file.$f)),* } };
        }
        pick!(
            model,
            family,
            algo,
            method,
            method_config,
            inner_steps,
            inner_lr,
            meta_batch,
            meta_steps,
            outer_lr,
            support,
            query,
            batch_size,
            max_len,
            seed,
            valid_every,
            n_way,
            train_base,
            tams,
            tams_config,
            activation_checkpointing,
            out
        )
    }
}

pub fn run(a: Args) -> Result<()> {
    let file = match &a.config {
        Some(p) => toml::from_str(
            &std::fs::read_to_string(p).with_context(|| format!("{}: cannot read", p.display()))?,
        )
        .with_context(|| format!("{}: bad prepare config", p.display()))?,
        None => PrepareArgs::default(),
    };
    let r = a.run.over(file);
    let out = r.out.clone().context("--out is required")?;
    let algo = Algo::parse(r.algo.as_deref().unwrap_or("fomaml"))?;
    let family_arg = r.family.clone();
    let method = r
        .method
        .clone()
        .unwrap_or_else(|| if algo == Algo::Mltd { "tarp" } else { "lora" }.into());
    let train_base = algo.trains_base() || r.train_base.unwrap_or(false);
    let d = MetaConfig::default();
    let cfg = MetaConfig {
        algo,
        inner_steps: r.inner_steps.unwrap_or(d.inner_steps),
        inner_lr: r.inner_lr.unwrap_or(d.inner_lr),
        meta_batch: r.meta_batch.unwrap_or(d.meta_batch),
        meta_steps: r.meta_steps.unwrap_or(d.meta_steps),
        outer_lr: r
            .outer_lr
            .unwrap_or(if train_base { 1e-5 } else { d.outer_lr }),
        support: r.support.unwrap_or(d.support),
        query: r.query.unwrap_or(d.query),
        batch: r.batch_size.unwrap_or(d.batch),
        max_len: r.max_len.unwrap_or(d.max_len),
        seed: r.seed.unwrap_or(d.seed),
        valid_every: r.valid_every.unwrap_or(d.valid_every),
        train_base,
        ..d
    };
    std::fs::create_dir_all(&out)?;
    io::write_atomic(
        &out.join("run.json"),
        serde_json::to_string_pretty(&r)?.as_bytes(),
    )?;

    let spec = super::model_or_default(r.model.clone(), metapeft::assets::SMOLLM2)?;
    let ck = model::load(&spec, &Device::Cpu)?;
    let encoder = matches!(ck.arch, Arch::Bert(_));
    // Encoders meta-learn N-way classification, decoders language modelling.
    let family_name = family_arg.unwrap_or_else(|| {
        if encoder {
            "intent-clinc"
        } else {
            "lm-domains"
        }
        .into()
    });
    let fam = family::load(&family_name, &metapeft::assets::data_dir())?;
    eprintln!(
        "family {family_name}: {} meta-train, {} meta-valid, {} meta-test tasks (meta-test: {})",
        fam.meta_train.len(),
        fam.meta_valid.len(),
        fam.meta_test.len(),
        fam.meta_test
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let delta_cfg = match &r.method_config {
        Some(p) => config_from_file(p)?,
        None => default_config(&method, &ck.arch)?,
    };
    let fresh = delta_cfg.init(&ck.arch, &ck.params, cfg.seed)?;
    let mut deltas = fresh.attach(&ck.arch, &ck.params)?;
    let tams_cfg: Option<TamsConfig> = match (&r.tams_config, r.tams.unwrap_or(false)) {
        (Some(p), _) => Some(read_tams_config(p)?),
        (None, true) => Some(TamsConfig::default()),
        (None, false) => None,
    };
    let dims = ModelDims::of(&ck.arch);
    let tams_state = match &tams_cfg {
        Some(tc) => {
            let params = tc.init(dims, &ck.params, cfg.seed ^ 0x7a35)?;
            let (cell, controller) = tc.build(dims, &params)?;
            deltas.push(cell);
            Some((params, controller))
        }
        None => None,
    };
    // Priming meta-learns the base only: every episode starts from the same fresh delta.
    let init = if algo == Algo::Prime {
        fresh.params.detached()
    } else {
        fresh.params.clone()
    };
    let mut base = ck.params.clone();
    if train_base {
        base.make_trainable(|n| !n.ends_with("embed_tokens.weight"))?;
    }
    // Tagging families share one tag set, so the per-token head is meta-learned with the delta.
    let tags = match (&ck.arch, fam.kind) {
        (Arch::Bert(_), TaskKind::TokenClassification) => fam.tag_set(),
        _ => vec![],
    };
    let tag_head = if tags.is_empty() {
        None
    } else {
        let mut h = new_head(tags.len(), dims.hidden, cfg.seed ^ 0x4ead)?;
        h.make_trainable(|_| true)?;
        Some(h)
    };
    let lrs = if algo == Algo::MetaSgd {
        let mut l = ParamStore::new();
        for (n, p) in init.iter().chain(tag_head.iter().flat_map(|h| h.iter())) {
            l.insert_trainable(
                n,
                Var::from_tensor(&(p.tensor().ones_like()? * cfg.inner_lr)?)?,
            );
        }
        Some(l)
    } else {
        None
    };
    let (llama, bert) = match &ck.arch {
        Arch::Llama(c) => {
            let l = Llama::new(c.clone(), &Device::Cpu)?
                .with_activation_checkpointing(r.activation_checkpointing.unwrap_or(false));
            (Some(l), None)
        }
        Arch::Bert(c) => {
            let b = Bert::new(c.clone())
                .with_activation_checkpointing(r.activation_checkpointing.unwrap_or(false));
            (None, Some(b))
        }
    };
    let net = match (&llama, &bert) {
        (Some(l), _) => Net::Decoder(l),
        (_, Some(b)) => Net::Encoder(b),
        _ => unreachable!("one of the two is built"),
    };
    let template = metapeft::train::setup::prompt_template(match family_name.as_str() {
        "summ-domains" => "dialogsum",
        "dialogue-topics" => "dailydialog",
        other => other,
    });
    let mm = MetaModel {
        model: net,
        n_way: r.n_way.unwrap_or(5),
        tok: &ck.tokenizer,
        base: &base,
        deltas: &deltas,
        init: &init,
        lrs: lrs.as_ref(),
        template,
        tams: match (&tams_cfg, &tams_state) {
            (Some(config), Some((params, controller))) => Some(TamsParts {
                config,
                controller,
                params,
            }),
            _ => None,
        },
        tag_head: tag_head.as_ref().map(|params| TagHead {
            tags: &tags,
            params,
        }),
    };
    eprintln!(
        "preparing with {} ({} delta, {} inner steps at {}, meta-batch {}, {} outer steps{})",
        algo.name(),
        method,
        cfg.inner_steps,
        cfg.inner_lr,
        cfg.meta_batch,
        cfg.meta_steps,
        if train_base { ", base trained" } else { "" }
    );
    let report = meta_train(&cfg, &mm, &fam, Some(&out), a.resume)?;
    let architectures = task_architectures(&cfg, &mm, &fam)?;
    if let (Some(tc), Some((params, _))) = (&tams_cfg, &tams_state) {
        let dir = out.join("tams");
        std::fs::create_dir_all(&dir)?;
        io::write_atomic(
            &dir.join("tams_config.json"),
            serde_json::to_string_pretty(tc)?.as_bytes(),
        )?;
        let t: std::collections::HashMap<String, candle_core::Tensor> = params
            .iter()
            .map(|(n, p)| (n.to_string(), p.tensor().detach()))
            .collect();
        io::save_safetensors(&t, &dir.join("tams.safetensors"))?;
        tams::write_architectures(&dir, &architectures)?;
        eprintln!("TAMS architecture per meta-train task:");
        for (task, arch) in &architectures {
            eprintln!("  {task:<28} {arch}");
        }
    }

    let adapter = Adapter {
        config: delta_cfg.clone(),
        params: init.detached(),
    };
    io::save_adapter(
        &adapter,
        &ck.arch,
        &super::peft::base_name(&ck),
        &prepared::adapter_dir(&out),
        AdapterFormat::Native,
    )?;
    if let Some(h) = &tag_head {
        let dir = prepared::head_dir(&out);
        std::fs::create_dir_all(&dir)?;
        save_head(&h.detached(), &tags, HEAD_TOKEN, &dir)?;
    }
    if train_base {
        io::hf_dir::write_parts(
            &ck.arch,
            &base.detached(),
            &ck.tokenizer,
            &out.join("model"),
        )?;
    }
    if let Some(l) = &lrs {
        let t: std::collections::HashMap<String, candle_core::Tensor> = l
            .iter()
            .map(|(n, p)| (n.to_string(), p.tensor().detach()))
            .collect();
        io::save_safetensors(&t, &out.join("meta_sgd_lrs.safetensors"))?;
    }
    let info = prepared::PreparedInfo {
        format_version: prepared::FORMAT_VERSION,
        algo: algo.name(),
        family: family_name,
        base_model: spec,
        base_trained: train_base,
        method,
        config: serde_json::to_value(&cfg)?,
        report: serde_json::to_value(&report)?,
        architectures: if architectures.is_empty() {
            None
        } else {
            Some(serde_json::to_value(&architectures)?)
        },
    };
    prepared::write_info(&out, &info)?;
    println!("{}", serde_json::to_string_pretty(&info.report)?);
    Ok(())
}

fn read_tams_config(p: &std::path::Path) -> Result<TamsConfig> {
    let text =
        std::fs::read_to_string(p).with_context(|| format!("{}: cannot read", p.display()))?;
    if p.extension().is_some_and(|e| e == "toml") {
        toml::from_str(&text).with_context(|| format!("{}: bad TAMS config", p.display()))
    } else {
        serde_json::from_str(&text).with_context(|| format!("{}: bad TAMS config", p.display()))
    }
}
