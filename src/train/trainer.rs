//! The training loop.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{backprop::GradStore, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::checkpoint::{self, LoopState};
use super::optim::{clip_grad_norm, Optimizer, OptimizerConfig};
use super::schedule::Schedule;
use crate::{Error, Result};

/// What the trainer optimises. Both methods must be deterministic functions of their arguments
/// (derive batch order from the step, not from hidden state) so a resumed run replays exactly.
pub trait Objective {
    /// The loss of micro-batch `micro` of optimiser step `step`.
    fn loss(&mut self, step: usize, micro: usize) -> Result<Tensor>;
    /// The evaluation metric (higher or lower is better per [`TrainConfig::higher_is_better`]).
    fn evaluate(&mut self) -> Result<f64>;
    /// Tokens in micro-batch `micro` of `step`, for the tokens/s display.
    fn tokens(&self, _step: usize, _micro: usize) -> usize {
        0
    }
}

fn one() -> usize {
    1
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub steps: usize,
    pub lr: f64,
    #[serde(default = "constant")]
    pub schedule: Schedule,
    #[serde(default)]
    pub optimizer: OptimizerConfig,
    /// Clip the global gradient norm to this value.
    #[serde(default)]
    pub grad_clip: Option<f64>,
    /// Micro-batches per optimiser step.
    #[serde(default = "one")]
    pub grad_accum: usize,
    #[serde(default)]
    pub eval_every: Option<usize>,
    /// Stop after this many evaluations without improvement (needs `eval_every`).
    #[serde(default)]
    pub patience: Option<usize>,
    #[serde(default)]
    pub higher_is_better: bool,
    /// Checkpoint every N steps (and always at the end); 0: only at the end.
    #[serde(default)]
    pub checkpoint_every: usize,
    /// End with the parameters of the best evaluation (needs `eval_every`) instead of the last.
    #[serde(default)]
    pub restore_best: bool,
    /// Testing aid: stop abruptly after this step without a final checkpoint, as a crash would.
    #[serde(default)]
    pub halt_after: Option<usize>,
}

fn constant() -> Schedule {
    Schedule::Constant
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TrainReport {
    pub steps: usize,
    pub final_loss: f64,
    pub best_metric: Option<f64>,
    pub best_step: Option<usize>,
    pub stopped_early: bool,
    pub resumed_from: Option<usize>,
    /// The final parameters are those of `best_step` (`restore_best`), not of the last step.
    pub restored_best: bool,
    pub log: Option<PathBuf>,
}

fn add_grads(acc: &mut GradStore, g: GradStore, vars: &[(String, Var)]) -> Result<()> {
    for (_, v) in vars {
        if let Some(new) = g.get(v.as_tensor()) {
            let sum = match acc.get(v.as_tensor()) {
                Some(old) => (old + new)?,
                None => new.clone(),
            };
            acc.insert(v.as_tensor(), sum);
        }
    }
    Ok(())
}

/// Train `vars` on `obj`. With `out`, writes `metrics.jsonl` and checkpoints there, and (when
/// `resume`) continues from the newest checkpoint found.
pub fn train(
    cfg: &TrainConfig,
    vars: Vec<(String, Var)>,
    obj: &mut dyn Objective,
    out: Option<&Path>,
    resume: bool,
) -> Result<TrainReport> {
    if cfg.grad_accum == 0 {
        return Err(Error::invalid("grad_accum must be at least 1"));
    }
    if cfg.patience.is_some() && cfg.eval_every.is_none() {
        return Err(Error::invalid("early stopping (patience) needs eval_every"));
    }
    if cfg.restore_best && cfg.eval_every.is_none() {
        return Err(Error::invalid("restore_best needs eval_every"));
    }
    let mut opt = Optimizer::new(cfg.optimizer.clone(), vars)?;
    let mut st = LoopState::default();
    let mut best: Option<std::collections::HashMap<String, Tensor>> = None;
    let mut resumed_from = None;
    let log_path = out.map(|d| d.join("metrics.jsonl"));
    if let Some(d) = out {
        std::fs::create_dir_all(d)?;
        if resume {
            if let Some(ck) = checkpoint::find(d) {
                st = checkpoint::load(&ck, &mut opt)?;
                resumed_from = Some(st.step);
                if cfg.restore_best {
                    best = checkpoint::load_best(&ck)?;
                }
                // Drop log lines written after the checkpoint: they will be replayed.
                if let Some(lp) = &log_path {
                    truncate_log(lp, st.step)?;
                }
            }
        } else if let Some(lp) = &log_path {
            let _ = std::fs::remove_file(lp);
        }
    }
    let mut log = open_log(log_path.as_deref())?;
    let pb = progress(cfg.steps, st.step);
    let started = Instant::now();
    let mut tokens = 0usize;
    let mut final_loss = f64::NAN;
    let mut stopped_early = false;
    while st.step < cfg.steps {
        let step = st.step;
        let lr = cfg.lr * cfg.schedule.factor(step, cfg.steps);
        let mut acc: Option<GradStore> = None;
        let mut loss_sum = 0.0;
        for micro in 0..cfg.grad_accum {
            let loss = obj.loss(step, micro)?;
            let l = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
            if !l.is_finite() {
                pb.abandon();
                let ck = out
                    .and_then(checkpoint::find)
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "none".into());
                return Err(Error::invalid(format!(
                    "loss became {l} at step {} (micro-batch {micro}); training stopped. Last good checkpoint: {ck}. \
                     Try a lower learning rate or gradient clipping",
                    step + 1
                )));
            }
            loss_sum += l;
            tokens += obj.tokens(step, micro);
            let g = crate::ops::backward(&(loss / cfg.grad_accum as f64)?)?;
            match acc.as_mut() {
                None => acc = Some(g),
                Some(a) => add_grads(a, g, opt.vars())?,
            }
        }
        let mut acc = acc.ok_or_else(|| Error::invalid("no micro-batch"))?;
        let grad_norm = match cfg.grad_clip {
            Some(c) => clip_grad_norm(&mut acc, opt.vars(), c)?,
            None => f64::NAN,
        };
        opt.step(&acc, lr)?;
        st.step += 1;
        st.optimizer_steps = opt.steps;
        final_loss = loss_sum / cfg.grad_accum as f64;
        let elapsed = started.elapsed().as_secs_f64();
        let mut rec = serde_json::json!({"step": st.step, "loss": final_loss, "lr": lr, "elapsed_s": elapsed});
        if grad_norm.is_finite() {
            rec["grad_norm"] = grad_norm.into();
        }
        if tokens > 0 {
            rec["tokens_per_s"] = (tokens as f64 / elapsed.max(1e-9)).into();
        }
        if let Some(every) = cfg.eval_every {
            if st.step % every == 0 || st.step == cfg.steps {
                let m = obj.evaluate()?;
                rec["eval_metric"] = m.into();
                let better = match st.best_metric {
                    None => true,
                    Some(b) => {
                        if cfg.higher_is_better {
                            m > b
                        } else {
                            m < b
                        }
                    }
                };
                if better {
                    st.best_metric = Some(m);
                    st.best_step = Some(st.step);
                    st.bad_evals = 0;
                    if cfg.restore_best {
                        best = Some(
                            opt.vars()
                                .iter()
                                .map(|(n, v)| Ok((n.clone(), v.as_tensor().detach().copy()?)))
                                .collect::<Result<_>>()?,
                        );
                    }
                } else {
                    st.bad_evals += 1;
                }
                if cfg.patience.is_some_and(|p| st.bad_evals >= p) {
                    stopped_early = true;
                }
            }
        }
        if let Some(f) = log.as_mut() {
            writeln!(f, "{rec}")?;
        }
        pb.set_position(st.step as u64);
        pb.set_message(format!(
            "loss {final_loss:.4}{}",
            if tokens > 0 {
                format!(", {:.0} tok/s", tokens as f64 / elapsed.max(1e-9))
            } else {
                String::new()
            }
        ));
        if cfg.halt_after == Some(st.step) {
            pb.abandon();
            return Err(Error::invalid(format!(
                "halted after step {} (halt_after)",
                st.step
            )));
        }
        if let Some(d) = out {
            if cfg.checkpoint_every > 0 && st.step % cfg.checkpoint_every == 0 {
                checkpoint::save(d, &opt, &st, best.as_ref())?;
            }
        }
        if stopped_early {
            break;
        }
    }
    pb.finish_and_clear();
    let mut restored_best = false;
    if let (true, Some(b), Some(bs)) = (cfg.restore_best, &best, st.best_step) {
        if bs != st.step {
            for (name, v) in opt.vars() {
                let t = b.get(name).ok_or_else(|| {
                    Error::invalid(format!("no best-evaluation copy of `{name}`"))
                })?;
                v.set(&t.to_dtype(v.dtype())?)?;
            }
            restored_best = true;
        }
    }
    if let Some(d) = out {
        checkpoint::save(d, &opt, &st, best.as_ref())?;
    }
    Ok(TrainReport {
        steps: st.step,
        final_loss,
        best_metric: st.best_metric,
        best_step: st.best_step,
        stopped_early,
        resumed_from,
        restored_best,
        log: log_path,
    })
}

/// The JSONL metrics log, opened for appending.
pub(crate) fn open_log(path: Option<&Path>) -> Result<Option<std::fs::File>> {
    Ok(match path {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)?,
        ),
        None => None,
    })
}

/// Keep only the JSONL records of steps up to `step` (a resumed run replays the rest).
pub(crate) fn truncate_log(path: &Path, step: usize) -> Result<()> {
    if let Ok(text) = std::fs::read_to_string(path) {
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                    .is_some_and(|s| s as usize <= step)
            })
            .collect();
        crate::io::write_atomic(
            path,
            (kept.join("\n") + if kept.is_empty() { "" } else { "\n" }).as_bytes(),
        )?;
    }
    Ok(())
}

fn progress(total: usize, done: usize) -> indicatif::ProgressBar {
    progress_bar("train", total, done)
}

/// A progress bar on stderr (hidden when stderr is not a terminal or METAPEFT_NO_PROGRESS is set).
pub(crate) fn progress_bar(label: &str, total: usize, done: usize) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() || std::env::var_os("METAPEFT_NO_PROGRESS").is_some() {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(total as u64);
    pb.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{label} [{{bar:30}}] {{pos}}/{{len}} {{msg}} eta {{eta}}"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    pb.set_position(done as u64);
    pb
}
