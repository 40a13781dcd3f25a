//! Trainer tests on a tiny Llama with LoRA.

use candle_core::{DType, Tensor};

use super::*;
use crate::model::testing::tiny_llama;
use crate::model::{Arch, Llama};
use crate::params::ParamStore;
use crate::peft::lora::LoraConfig;
use crate::peft::{DeltaConfig, DeltaSet};
use crate::{Error, Result};

struct Lm {
    model: Llama,
    base: ParamStore,
    deltas: DeltaSet,
    params: ParamStore,
    /// Rows per micro-batch, and how many micro-batches a step's full batch is split into.
    rows: usize,
    nan_at: Option<usize>,
    metrics: Vec<f64>,
}

/// A deterministic batch: rows `[first, first + n)` of an endless pseudo-random token stream
/// with a learnable pattern (each token predicts the next one by a fixed rule).
fn rows(first: usize, n: usize) -> Result<Tensor> {
    let t = 8;
    let v: Vec<u32> = (0..n)
        .flat_map(|r| {
            let start = ((first + r) * 7 % 31) as u32 + 1;
            (0..t).map(move |i| 1 + (start + 3 * i as u32) % 31)
        })
        .collect();
    Ok(Tensor::from_vec(v, (n, t), &candle_core::Device::Cpu)?)
}

impl Objective for Lm {
    fn loss(&mut self, step: usize, micro: usize) -> Result<Tensor> {
        if self.nan_at == Some(step) {
            return Ok(Tensor::new(f32::NAN, &candle_core::Device::Cpu)?);
        }
        let ids = rows(step * 4 + micro * self.rows, self.rows)?;
        let t = ids.dim(1)?;
        let logits = self
            .model
            .forward(&self.base, &self.deltas, &self.params, &ids, None)?;
        Ok(crate::ops::cross_entropy(
            &logits.narrow(1, 0, t - 1)?,
            &ids.narrow(1, 1, t - 1)?,
            -100,
        )?)
    }

    fn evaluate(&mut self) -> Result<f64> {
        if !self.metrics.is_empty() {
            return Ok(self.metrics.remove(0));
        }
        let ids = rows(10_000, 4)?;
        let t = ids.dim(1)?;
        let logits = self
            .model
            .forward(&self.base, &self.deltas, &self.params, &ids, None)?;
        Ok(crate::ops::cross_entropy(
            &logits.narrow(1, 0, t - 1)?,
            &ids.narrow(1, 1, t - 1)?,
            -100,
        )?
        .to_scalar::<f32>()? as f64)
    }

    fn tokens(&self, _step: usize, _micro: usize) -> usize {
        self.rows * 8
    }
}

fn setup(rows: usize) -> Result<Lm> {
    let (model, base) = tiny_llama(21, DType::F32)?;
    let arch = Arch::Llama(model.cfg.clone());
    let a = DeltaConfig::Lora(LoraConfig::new(4, 8.0, &["q_proj", "v_proj", "down_proj"]))
        .init(&arch, &base, 3)?;
    let deltas = a.attach(&arch, &base)?;
    Ok(Lm {
        model,
        base,
        deltas,
        params: a.params,
        rows,
        nan_at: None,
        metrics: vec![],
    })
}

fn cfg(steps: usize) -> TrainConfig {
    TrainConfig {
        steps,
        lr: 1e-2,
        schedule: Schedule::Linear { warmup: 2 },
        optimizer: OptimizerConfig::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        },
        grad_clip: Some(1.0),
        grad_accum: 1,
        eval_every: None,
        patience: None,
        higher_is_better: false,
        checkpoint_every: 0,
        restore_best: false,
        halt_after: None,
    }
}

fn snapshot(p: &ParamStore) -> Vec<Vec<f32>> {
    p.vars()
        .iter()
        .map(|(_, v)| {
            v.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect()
}

fn temp(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("metapeft-train-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn training_lowers_the_loss() -> Result<()> {
    let mut lm = setup(4)?;
    let before = lm.evaluate()?;
    let vars = lm.params.vars();
    let mut c = cfg(40);
    c.lr = 5e-2;
    let r = train(&c, vars, &mut lm, None, false)?;
    let after = lm.evaluate()?;
    assert_eq!(r.steps, 40);
    assert!(after < before * 0.8, "eval loss {before} -> {after}");
    Ok(())
}

#[test]
fn a_crashed_run_resumes_to_identical_parameters_and_log() -> Result<()> {
    let mut c = cfg(12);
    c.checkpoint_every = 4;
    c.eval_every = Some(3);
    let mut full = setup(4)?;
    let d1 = temp("full");
    train(&c, full.params.vars(), &mut full, Some(&d1), false)?;

    let mut crashed = setup(4)?;
    let d2 = temp("crash");
    let mut halting = c.clone();
    halting.halt_after = Some(10);
    let err = train(
        &halting,
        crashed.params.vars(),
        &mut crashed,
        Some(&d2),
        false,
    )
    .unwrap_err();
    assert!(err.to_string().contains("halted after step 10"));
    // A fresh process: new model objects, state only from disk.
    let mut resumed = setup(4)?;
    let r = train(&c, resumed.params.vars(), &mut resumed, Some(&d2), true)?;
    assert_eq!(r.resumed_from, Some(8));
    assert_eq!(
        snapshot(&resumed.params),
        snapshot(&full.params),
        "bit-identical parameters"
    );
    let log = |d: &std::path::Path| std::fs::read_to_string(d.join("metrics.jsonl")).unwrap();
    let strip = |s: String| -> Vec<serde_json::Value> {
        s.lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                for k in ["elapsed_s", "tokens_per_s"] {
                    v.as_object_mut().unwrap().remove(k);
                }
                v
            })
            .collect()
    };
    assert_eq!(
        strip(log(&d2)),
        strip(log(&d1)),
        "same metrics, each step logged once"
    );
    Ok(())
}

#[test]
fn same_seed_same_numbers() -> Result<()> {
    let run = || -> Result<Vec<Vec<f32>>> {
        let mut lm = setup(4)?;
        train(&cfg(5), lm.params.vars(), &mut lm, None, false)?;
        Ok(snapshot(&lm.params))
    };
    assert_eq!(run()?, run()?);
    Ok(())
}

#[test]
fn non_finite_loss_stops_and_keeps_the_last_good_checkpoint() -> Result<()> {
    let mut lm = setup(4)?;
    lm.nan_at = Some(3);
    let mut c = cfg(10);
    c.checkpoint_every = 1;
    let d = temp("nan");
    let err = train(&c, lm.params.vars(), &mut lm, Some(&d), false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("NaN at step 4") && err.contains("checkpoint"),
        "{err}"
    );
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("checkpoint/state.json"))?)
            .map_err(Error::invalid)?;
    assert_eq!(state["step"], 3);
    Ok(())
}

#[test]
fn early_stopping_and_accumulation() -> Result<()> {
    let mut lm = setup(4)?;
    lm.metrics = vec![1.0, 0.9, 0.95, 0.97, 0.99, 0.5];
    let mut c = cfg(20);
    c.eval_every = Some(1);
    c.patience = Some(3);
    let r = train(&c, lm.params.vars(), &mut lm, None, false)?;
    assert!(r.stopped_early);
    assert_eq!(
        (r.steps, r.best_metric, r.best_step),
        (5, Some(0.9), Some(2))
    );

    // restore_best ends with the parameters of the best evaluation (step 2), also across a resume.
    let mut c = cfg(20);
    c.eval_every = Some(1);
    c.patience = Some(3);
    c.restore_best = true;
    let mut two = setup(4)?;
    let mut c2 = cfg(20);
    c2.halt_after = Some(2);
    assert!(train(&c2, two.params.vars(), &mut two, None, false).is_err());
    let mut lm = setup(4)?;
    lm.metrics = vec![1.0, 0.9, 0.95, 0.97, 0.99, 0.5];
    let r = train(&c, lm.params.vars(), &mut lm, None, false)?;
    assert!(r.restored_best && r.stopped_early);
    assert_eq!(snapshot(&lm.params), snapshot(&two.params));
    let dir = std::env::temp_dir().join(format!("metapeft-best-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut crashed = setup(4)?;
    crashed.metrics = vec![1.0, 0.9, 0.95, 0.97];
    let mut ch = c.clone();
    ch.checkpoint_every = 3;
    ch.halt_after = Some(4);
    assert!(train(&ch, crashed.params.vars(), &mut crashed, Some(&dir), false).is_err());
    let mut resumed = setup(4)?;
    resumed.metrics = vec![0.97, 0.99, 0.5];
    ch.halt_after = None;
    let r = train(&ch, resumed.params.vars(), &mut resumed, Some(&dir), true)?;
    assert_eq!(
        (r.resumed_from, r.best_step, r.restored_best),
        (Some(3), Some(2), true)
    );
    assert_eq!(snapshot(&resumed.params), snapshot(&two.params));

    // One step on a batch of 4 equals one step accumulating two micro-batches of 2.
    let mut a = setup(4)?;
    let mut b = setup(2)?;
    let mut ca = cfg(1);
    ca.grad_clip = None;
    let mut cb = ca.clone();
    cb.grad_accum = 2;
    train(&ca, a.params.vars(), &mut a, None, false)?;
    train(&cb, b.params.vars(), &mut b, None, false)?;
    for (x, y) in snapshot(&a.params).iter().zip(snapshot(&b.params)) {
        for (p, q) in x.iter().zip(&y) {
            assert!((p - q).abs() < 1e-5, "{p} vs {q}");
        }
    }
    Ok(())
}
