//! The meta-training loop: sample a meta-batch of episodes from the meta-train tasks, take each
//! algorithm's meta-gradient, average, take one outer step; validate on held-out tasks; checkpoint
//! so a killed run resumes exactly (episode sampling is a pure function of seed and step).

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use candle_core::{Tensor, Var};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::episode::{ClsEpisode, LmEpisode, TagEpisode};
use super::maml::EpisodeLoss;
use super::maml::{self, EpisodeGrads, InnerLoop};
use super::tams::{self, ArchMode, Architecture, Controller, TamsConfig};
use crate::data::batch::{encoder_items, tagged_items};
use crate::data::batch::{sequences, Sequence};
use crate::data::family::{episode, n_way_episode, FamilyTask, TaskFamily};
use crate::data::{Content, Example, TaskKind};
use crate::model::{Bert, Llama, TextTokenizer};
use crate::params::ParamStore;
use crate::peft::DeltaSet;
use crate::train::checkpoint::{self, LoopState};
use crate::train::objectives::new_head;
use crate::train::optim::{clip_grad_norm_slice, Optimizer, OptimizerConfig};
use crate::{Error, Result};

/// The preparation algorithms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Algo {
    /// First-order MAML.
    Fomaml,
    /// Exact second-order MAML.
    Maml,
    /// Second-order MAML with finite-difference Hessian-vector products.
    MamlHf,
    Reptile,
    /// Inner loop on the last layer's delta only ("almost no inner loop").
    Anil,
    /// First-order MAML with learned per-parameter inner rates.
    MetaSgd,
    /// Meta-Learning the Difference: first-order, TARP delta (plus TAMS when enabled).
    Mltd,
    /// Priming (Gheini et al.): the inner loop trains a fresh delta, the outer loop the base.
    Prime,
    /// Ordinary training on the union of meta-train tasks (a baseline; no inner loop).
    Multitask,
}

impl Algo {
    pub const ALL: [&'static str; 9] = [
        "fomaml",
        "maml",
        "maml-hf",
        "reptile",
        "anil",
        "meta-sgd",
        "mltd",
        "prime",
        "multitask",
    ];

    pub fn parse(s: &str) -> Result<Self> {
        serde_json::from_value(serde_json::Value::String(s.to_string())).map_err(|_| {
            Error::invalid(format!(
                "unknown algorithm `{s}`; choose one of {}",
                Self::ALL.join(", ")
            ))
        })
    }

    pub fn name(self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default()
    }

    /// Whether the outer loop updates the base model.
    pub fn trains_base(self) -> bool {
        self == Algo::Prime
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetaConfig {
    pub algo: Algo,
    pub inner_steps: usize,
    pub inner_lr: f64,
    /// Episodes per outer step.
    pub meta_batch: usize,
    pub meta_steps: usize,
    pub outer_lr: f64,
    /// Examples in an episode's support and query sets.
    pub support: usize,
    pub query: usize,
    /// Support sequences per inner step.
    pub batch: usize,
    pub max_len: usize,
    pub seed: u64,
    /// Meta-validate every N outer steps (and at the end); 0: only at the end.
    pub valid_every: usize,
    /// Episodes per meta-valid task.
    pub valid_episodes: usize,
    /// Also update the base model in the outer loop (always on for priming).
    pub train_base: bool,
    /// Step length of the Hessian-free finite differences.
    pub hf_eps: f64,
    pub grad_clip: Option<f64>,
    pub checkpoint_every: usize,
    /// Testing aid: stop abruptly after this outer step, as a crash would.
    #[serde(default)]
    pub halt_after: Option<usize>,
}

impl Default for MetaConfig {
    fn default() -> Self {
        MetaConfig {
            algo: Algo::Fomaml,
            // Measured on lm-domains (SmolLM2 + LoRA): 0.05 barely moves the support loss.
            inner_steps: 2,
            inner_lr: 0.3,
            meta_batch: 4,
            meta_steps: 100,
            outer_lr: 1e-3,
            support: 8,
            query: 8,
            batch: 4,
            max_len: 128,
            seed: 0,
            valid_every: 25,
            valid_episodes: 2,
            train_base: false,
            hf_eps: 1e-3,
            grad_clip: Some(1.0),
            checkpoint_every: 10,
            halt_after: None,
        }
    }
}

/// The network being prepared.
#[derive(Clone, Copy)]
pub enum Net<'a> {
    /// Language-modelling and prompt -> completion families.
    Decoder(&'a Llama),
    /// Classification families: N-way episodes with a fresh linear head each; token
    /// classification families: tagging episodes with a meta-learned head ([`MetaModel::tag_head`]).
    Encoder(&'a Bert),
}

impl Net<'_> {
    fn layers(&self) -> usize {
        match self {
            Net::Decoder(m) => m.cfg.num_hidden_layers,
            Net::Encoder(m) => m.cfg.num_hidden_layers,
        }
    }
}

/// What is being prepared: the network, its tokenizer, the base and delta stores.
pub struct MetaModel<'a> {
    pub model: Net<'a>,
    pub tok: &'a TextTokenizer,
    /// The base; entries are `Var`s where the outer loop trains it.
    pub base: &'a ParamStore,
    pub deltas: &'a DeltaSet,
    /// The delta's initial values: `Var`s when meta-learned, frozen for priming.
    pub init: &'a ParamStore,
    /// Meta-SGD's learned inner rates, named like `init`'s entries.
    pub lrs: Option<&'a ParamStore>,
    /// How prompt -> completion examples are shown (`{prompt}` is replaced).
    pub template: &'a str,
    /// Classes per episode of a classification family.
    pub n_way: usize,
    /// TAMS: the cell must also be in `deltas`; its shared weights and the controller are here.
    pub tams: Option<TamsParts<'a>>,
    /// Token classification: the per-token head every episode starts from.
    pub tag_head: Option<TagHead<'a>>,
}

/// The per-token head of a tagging family. Every task shares the tag set (WikiANN's languages
/// all tag PER/ORG/LOC in BIO), so, unlike an N-way episode's head, its initial values are
/// meta-variables: `prepare` saves them and `adapt --from` starts from them.
#[derive(Clone, Copy)]
pub struct TagHead<'a> {
    /// The tag set; row `i` of the head scores `tags[i]`.
    pub tags: &'a [String],
    /// `classifier.weight` `[tags, hidden]` and `classifier.bias` `[tags]`, as `Var`s.
    pub params: &'a ParamStore,
}

/// TAMS during meta-training: the controller picks each episode's cell architecture from the
/// support set; the cell's weights are adapted in the inner loop with the delta, the controller
/// is trained in the outer loop through the straight-through architecture.
#[derive(Clone, Copy)]
pub struct TamsParts<'a> {
    pub config: &'a TamsConfig,
    pub controller: &'a Controller,
    /// Cell weights (`tams.layers.*`) and controller weights (`tams.controller.*`), as `Var`s.
    pub params: &'a ParamStore,
}

/// The store an episode starts from: the delta's init, plus with TAMS the cell's weights and the
/// architecture the controller picks for this support set (carrying its graph to the
/// controller). Returns the architecture too.
pub fn episode_init(
    m: &MetaModel,
    support_ids: &[u32],
    rng: Option<&mut StdRng>,
) -> Result<(ParamStore, Option<Architecture>)> {
    let Some(t) = &m.tams else {
        return Ok((m.init.clone(), None));
    };
    let ids = support_ids.to_vec();
    let n = ids.len();
    let ids = Tensor::from_vec(ids, n, &candle_core::Device::Cpu)?;
    let emb = tams::task_embedding(m.base, &ids, None)?;
    let mode = if t.config.hard {
        ArchMode::Hard
    } else {
        ArchMode::Soft
    };
    let arch = t.controller.arch_weights(&emb, t.params, mode, rng)?;
    let chosen = Architecture::from_weights(&arch)?;
    let mut st = m.init.clone();
    for (name, p) in t.params.iter() {
        if !name.starts_with("tams.controller.") {
            st.insert(name, p.clone());
        }
    }
    st.insert_frozen(tams::ARCH, arch);
    Ok((st, Some(chosen)))
}

#[derive(Clone, Debug, Serialize)]
pub struct ValidResult {
    pub step: usize,
    /// Mean query loss over the meta-valid episodes, before and after the inner loop.
    pub loss_before: f64,
    pub loss_after: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct MetaReport {
    pub steps: usize,
    pub final_query_loss: f64,
    pub valid: Vec<ValidResult>,
    pub resumed_from: Option<usize>,
    pub seconds_per_episode: f64,
}

/// The names of the delta entries the inner loop adapts for `algo` on a model of `layers` (never
/// a TAMS architecture: the controller chooses it).
fn adapted_filter(algo: Algo, layers: usize) -> Box<dyn Fn(&str) -> bool + Sync> {
    match algo {
        // ANIL adapts the head; a decoder's head (the LM head) is frozen base, so there it is
        // the last layer's delta, the nearest thing the inner loop may train.
        Algo::Anil => {
            let last = format!(".layers.{}.", layers.saturating_sub(1));
            Box::new(move |n: &str| {
                (n.contains(&last) || n.starts_with("classifier.")) && n != tams::ARCH
            })
        }
        _ => Box::new(|n: &str| n != tams::ARCH),
    }
}

fn templated(examples: &[Example], template: &str) -> Vec<Example> {
    examples
        .iter()
        .cloned()
        .map(|mut e| {
            if let Content::PromptCompletion { prompt, .. } = &mut e.content {
                *prompt = template.replace("{prompt}", prompt);
            }
            e
        })
        .collect()
}

fn tokenized(m: &MetaModel, ex: &[Example], max_len: usize) -> Result<Vec<Sequence>> {
    let (s, _) = sequences(m.tok, &templated(ex, m.template), max_len)?;
    if s.is_empty() {
        return Err(Error::invalid("an episode produced no token sequences"));
    }
    Ok(s)
}

fn pad_id(tok: &TextTokenizer) -> u32 {
    tok.pad_id.or(tok.eos_ids.first().copied()).unwrap_or(0)
}

/// Seed of episode `b` of outer step `step` (a pure function, so resumed runs replay exactly).
fn episode_seed(seed: u64, step: usize, b: usize) -> u64 {
    seed ^ (step as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (b as u64).wrapping_mul(0xD1B5_4A32_D192_ED03)
}

/// One episode's losses, the support token ids (for a task embedding) and, for encoders, the
/// episode's head (to be added to the fast store): fresh for N-way episodes, the meta-learned
/// one for tagging.
struct Built<'a> {
    loss: Box<dyn EpisodeLoss + 'a>,
    ids: Vec<u32>,
    head: ParamStore,
}

/// Draw the episode of `task` from `seed` and build its losses for the network. Without an inner
/// loop (multitask) the support joins the query: the loss on the whole episode is an ordinary
/// training loss.
fn build_episode<'a>(
    cfg: &MetaConfig,
    m: &MetaModel<'a>,
    task: &FamilyTask,
    seed: u64,
    merge_support: bool,
) -> Result<Built<'a>> {
    match m.model {
        Net::Decoder(model) => {
            let ep = episode(task, cfg.support, cfg.query, seed)?;
            let mut support = tokenized(m, &ep.support, cfg.max_len)?;
            let mut query = tokenized(m, &ep.query, cfg.max_len)?;
            if merge_support {
                query.append(&mut support);
            }
            let from = if support.is_empty() { &query } else { &support };
            let ids = from.iter().flat_map(|s| s.ids.iter().copied()).collect();
            let loss = LmEpisode {
                model,
                deltas: m.deltas,
                support,
                query,
                batch: cfg.batch,
                pad: pad_id(m.tok),
            };
            Ok(Built {
                loss: Box::new(loss),
                ids,
                head: ParamStore::new(),
            })
        }
        Net::Encoder(model) if m.tag_head.is_some() => {
            let th = m.tag_head.expect("checked by the match guard");
            let ep = episode(task, cfg.support, cfg.query, seed)?;
            let (mut support, _) = tagged_items(m.tok, &ep.support, th.tags, cfg.max_len)?;
            let (mut query, _) = tagged_items(m.tok, &ep.query, th.tags, cfg.max_len)?;
            if merge_support {
                query.append(&mut support);
            }
            let from = if support.is_empty() { &query } else { &support };
            let ids = from.iter().flat_map(|s| s.ids.iter().copied()).collect();
            let loss = TagEpisode {
                model,
                deltas: m.deltas,
                support,
                query,
                batch: cfg.batch,
                pad: model.cfg.pad_token_id,
            };
            Ok(Built {
                loss: Box::new(loss),
                ids,
                head: th.params.clone(),
            })
        }
        Net::Encoder(model) => {
            let (ep, classes) = n_way_episode(task, m.n_way, cfg.support, cfg.query, seed)?;
            let (mut support, _) = encoder_items(m.tok, &ep.support, &classes, cfg.max_len)?;
            let (mut query, _) = encoder_items(m.tok, &ep.query, &classes, cfg.max_len)?;
            if merge_support {
                query.append(&mut support);
            }
            let ids = support.iter().flat_map(|s| s.ids.iter().copied()).collect();
            // A fresh head per episode: its classes are this episode's.
            let head = new_head(classes.len(), model.cfg.hidden_size, seed ^ 0x4ead)?.detached();
            let loss = ClsEpisode {
                model,
                deltas: m.deltas,
                support,
                query,
                batch: cfg.batch,
                pad: model.cfg.pad_token_id,
            };
            Ok(Built {
                loss: Box::new(loss),
                ids,
                head,
            })
        }
    }
}

/// The episode's starting store: the delta init (with TAMS: cell and architecture) plus the head.
fn start_store(m: &MetaModel, b: &Built, rng: Option<&mut StdRng>) -> Result<ParamStore> {
    let (mut init, _) = episode_init(m, &b.ids, rng)?;
    for (n, p) in b.head.iter() {
        init.insert(n, p.clone());
    }
    Ok(init)
}

/// One episode's meta-gradient for the configured algorithm.
fn episode_grads(
    cfg: &MetaConfig,
    m: &MetaModel,
    task: &FamilyTask,
    seed: u64,
    meta_vars: &[(String, Var)],
) -> Result<EpisodeGrads> {
    let multitask = cfg.algo == Algo::Multitask;
    let b = build_episode(cfg, m, task, seed, multitask)?;
    let mut rng = StdRng::seed_from_u64(seed ^ 0x7a35);
    let gumbel = m
        .tams
        .is_some_and(|t| t.config.gumbel_temperature.is_some());
    let init = start_store(m, &b, gumbel.then_some(&mut rng))?;
    let adapted = adapted_filter(cfg.algo, m.model.layers());
    let inner = InnerLoop {
        steps: if multitask { 0 } else { cfg.inner_steps },
        lr: cfg.inner_lr,
        adapted: adapted.as_ref(),
        learned_lrs: m.lrs,
    };
    let lm = b.loss.as_ref();
    match cfg.algo {
        Algo::Maml => maml::exact(lm, m.base, &init, &inner, meta_vars),
        Algo::MamlHf => maml::hessian_free(lm, m.base, &init, &inner, meta_vars, cfg.hf_eps),
        Algo::Reptile => maml::reptile(lm, m.base, &init, &inner, meta_vars),
        _ => maml::first_order(lm, m.base, &init, &inner, meta_vars),
    }
}

/// Query loss before and after the inner loop, averaged over fixed-seed episodes of `tasks`.
pub fn validate(cfg: &MetaConfig, m: &MetaModel, tasks: &[FamilyTask]) -> Result<(f64, f64)> {
    let (mut before, mut after, mut n) = (0.0, 0.0, 0usize);
    let adapted = adapted_filter(cfg.algo, m.model.layers());
    let inner = InnerLoop {
        steps: cfg.inner_steps,
        lr: cfg.inner_lr,
        adapted: adapted.as_ref(),
        learned_lrs: m.lrs,
    };
    let base = m.base.detached();
    for (ti, task) in tasks.iter().enumerate() {
        for e in 0..cfg.valid_episodes {
            let b = build_episode(cfg, m, task, 0x5eed_0000 + (ti * 100 + e) as u64, false)?;
            let init = start_store(m, &b, None)?.detached();
            let lm = b.loss.as_ref();
            before += lm.query(&base, &init)?.to_scalar::<f32>()? as f64;
            let (fast, _) = maml::adapted(lm, &base, &init, &inner)?;
            after += lm.query(&base, &fast)?.to_scalar::<f32>()? as f64;
            n += 1;
        }
    }
    let n = n.max(1) as f64;
    Ok((before / n, after / n))
}

/// Meta-train on `family`'s meta-train tasks. With `out`, writes `meta-metrics.jsonl` and
/// checkpoints there and (with `resume`) continues from the newest checkpoint.
pub fn meta_train(
    cfg: &MetaConfig,
    m: &MetaModel,
    family: &TaskFamily,
    out: Option<&Path>,
    resume: bool,
) -> Result<MetaReport> {
    let fits = match m.model {
        Net::Decoder(_) => matches!(
            family.kind,
            TaskKind::LanguageModeling | TaskKind::PromptCompletion
        ),
        Net::Encoder(_) => match family.kind {
            TaskKind::Classification => m.tag_head.is_none(),
            TaskKind::TokenClassification => m.tag_head.is_some(),
            _ => false,
        },
    };
    if !fits {
        return Err(Error::invalid(format!(
            "family `{}` is a {:?} family: meta-training supports decoders on language-modelling and \
             prompt->completion families, and encoders on classification and token-classification \
             families (the latter with a tag head)",
            family.name, family.kind
        )));
    }
    if family.meta_train.is_empty() {
        return Err(Error::invalid("the family has no meta-train tasks"));
    }
    if cfg.meta_batch == 0 || cfg.meta_steps == 0 {
        return Err(Error::invalid(
            "meta_batch and meta_steps must be at least 1",
        ));
    }
    let mut meta_vars = m.init.vars();
    meta_vars.extend(m.base.vars());
    if let Some(t) = &m.tams {
        meta_vars.extend(t.params.vars());
    }
    if let Some(h) = &m.tag_head {
        meta_vars.extend(h.params.vars());
    }
    if let Some(l) = m.lrs {
        meta_vars.extend(
            l.vars()
                .into_iter()
                .map(|(n, v)| (format!("meta_sgd_lr.{n}"), v)),
        );
    }
    let mut opt = Optimizer::new(
        OptimizerConfig::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        },
        meta_vars.clone(),
    )?;
    let mut st = LoopState::default();
    let mut resumed_from = None;
    let log_path = out.map(|d| d.join("meta-metrics.jsonl"));
    if let Some(d) = out {
        std::fs::create_dir_all(d)?;
        match (resume, checkpoint::find(d)) {
            (true, Some(ck)) => {
                st = checkpoint::load(&ck, &mut opt)?;
                resumed_from = Some(st.step);
                if let Some(lp) = &log_path {
                    crate::train::trainer::truncate_log(lp, st.step)?;
                }
            }
            _ => {
                if let Some(lp) = &log_path {
                    let _ = std::fs::remove_file(lp);
                }
            }
        }
    }
    let mut log = crate::train::trainer::open_log(log_path.as_deref())?;
    let mut valid = vec![];
    let pb = crate::train::trainer::progress_bar("prepare", cfg.meta_steps, st.step);
    let started = Instant::now();
    let mut episodes = 0usize;
    let mut final_q = f64::NAN;
    while st.step < cfg.meta_steps {
        let step = st.step;
        let mut acc: Vec<Option<Tensor>> = vec![None; meta_vars.len()];
        let (mut q_sum, mut s_first, mut s_last) = (0.0, 0.0, 0.0);
        for b in 0..cfg.meta_batch {
            let seed = episode_seed(cfg.seed, step, b);
            let ti = StdRng::seed_from_u64(seed).random_range(0..family.meta_train.len());
            let task = &family.meta_train[ti];
            let g = episode_grads(cfg, m, task, seed, &meta_vars).map_err(|e| {
                Error::invalid(format!(
                    "outer step {}, task `{}`: {e}",
                    step + 1,
                    task.name
                ))
            })?;
            q_sum += g.query_loss;
            s_first += g.support_losses.first().copied().unwrap_or(f64::NAN);
            s_last += g.support_losses.last().copied().unwrap_or(f64::NAN);
            for (a, gi) in acc.iter_mut().zip(g.grads) {
                if let Some(gi) = gi {
                    let gi = (gi / cfg.meta_batch as f64)?;
                    *a = Some(match a.take() {
                        Some(x) => (x + gi)?,
                        None => gi,
                    });
                }
            }
            episodes += 1;
        }
        let mut grads = acc;
        let grad_norm = match cfg.grad_clip {
            Some(c) => clip_grad_norm_slice(&mut grads, c)?,
            None => f64::NAN,
        };
        opt.step_with(&grads, cfg.outer_lr)?;
        st.step += 1;
        st.optimizer_steps = opt.steps;
        let nb = cfg.meta_batch as f64;
        final_q = q_sum / nb;
        let elapsed = started.elapsed().as_secs_f64();
        let per_episode = elapsed / episodes.max(1) as f64;
        let mut rec = serde_json::json!({
            "step": st.step, "query_loss": final_q, "support_loss_first": s_first / nb,
            "support_loss_last": s_last / nb, "grad_norm": grad_norm, "seconds_per_episode": per_episode,
        });
        let valid_now =
            (cfg.valid_every > 0 && st.step % cfg.valid_every == 0) || st.step == cfg.meta_steps;
        if valid_now && !family.meta_valid.is_empty() {
            let (b, a) = validate(cfg, m, &family.meta_valid)?;
            rec["valid_loss_before"] = b.into();
            rec["valid_loss_after"] = a.into();
            valid.push(ValidResult {
                step: st.step,
                loss_before: b,
                loss_after: a,
            });
            if st.best_metric.is_none_or(|best| a < best) {
                st.best_metric = Some(a);
                st.best_step = Some(st.step);
            }
        }
        if let Some(f) = log.as_mut() {
            writeln!(f, "{rec}")?;
        }
        pb.set_position(st.step as u64);
        pb.set_message(format!(
            "query loss {final_q:.3} (ppl {:.1}), {per_episode:.1} s/episode{}",
            final_q.exp(),
            valid
                .last()
                .map(|v| format!(", valid {:.3}->{:.3}", v.loss_before, v.loss_after))
                .unwrap_or_default()
        ));
        if cfg.halt_after == Some(st.step) {
            pb.abandon();
            return Err(Error::invalid(format!(
                "halted after outer step {} (halt_after)",
                st.step
            )));
        }
        if let Some(d) = out {
            if cfg.checkpoint_every > 0 && st.step % cfg.checkpoint_every == 0 {
                checkpoint::save(d, &opt, &st, None)?;
            }
        }
    }
    pb.finish_and_clear();
    if let Some(d) = out {
        checkpoint::save(d, &opt, &st, None)?;
    }
    Ok(MetaReport {
        steps: st.step,
        final_query_loss: final_q,
        valid,
        resumed_from,
        seconds_per_episode: started.elapsed().as_secs_f64() / episodes.max(1) as f64,
    })
}

/// Each meta-train task's architecture, chosen from a fixed episode's support set.
pub fn task_architectures(
    cfg: &MetaConfig,
    m: &MetaModel,
    family: &TaskFamily,
) -> Result<std::collections::BTreeMap<String, Architecture>> {
    let mut out = std::collections::BTreeMap::new();
    if m.tams.is_none() {
        return Ok(out);
    }
    for task in &family.meta_train {
        let b = build_episode(cfg, m, task, 0x5eed, false)?;
        if let (_, Some(a)) = episode_init(m, &b.ids, None)? {
            out.insert(task.name.clone(), a);
        }
    }
    Ok(out)
}
