//! Training checkpoints: trainable parameters, optimiser state and loop state, written so that a
//! crash at any moment leaves either the previous or the new checkpoint complete.
//!
//! Layout: `DIR/checkpoint/{params,optimizer}.safetensors` and `state.json`. A new checkpoint is
//! written to `checkpoint.new`, then swapped in (`checkpoint` -> `checkpoint.old`,
//! `checkpoint.new` -> `checkpoint`, remove `checkpoint.old`); the loader falls back to
//! `checkpoint.old` if a crash hit between the two renames.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::optim::Optimizer;
use crate::io::{load_safetensors, save_safetensors, write_atomic};
use crate::{Error, Result};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LoopState {
    pub step: usize,
    pub optimizer_steps: usize,
    pub best_metric: Option<f64>,
    pub best_step: Option<usize>,
    pub bad_evals: usize,
}

fn dir_of(out: &Path, suffix: &str) -> PathBuf {
    out.join(format!("checkpoint{suffix}"))
}

/// Write a checkpoint; `best` (the parameters at the best evaluation, kept for
/// `restore_best`) goes with it so a resumed run can still restore them.
pub fn save(
    out: &Path,
    opt: &Optimizer,
    state: &LoopState,
    best: Option<&HashMap<String, Tensor>>,
) -> Result<()> {
    let new = dir_of(out, ".new");
    let _ = std::fs::remove_dir_all(&new);
    std::fs::create_dir_all(&new)?;
    if let Some(b) = best {
        save_safetensors(b, &new.join("best.safetensors"))?;
    }
    let mut params: HashMap<String, Tensor> = HashMap::new();
    let mut moments: HashMap<String, Tensor> = HashMap::new();
    for (name, v) in opt.vars() {
        params.insert(name.clone(), v.as_tensor().detach());
        if let Some((m, v2)) = opt.state.get(name) {
            moments.insert(format!("m.{name}"), m.detach());
            if let Some(v2) = v2 {
                moments.insert(format!("v.{name}"), v2.detach());
            }
        }
    }
    save_safetensors(&params, &new.join("params.safetensors"))?;
    save_safetensors(&moments, &new.join("optimizer.safetensors"))?;
    write_atomic(
        &new.join("state.json"),
        serde_json::to_string_pretty(state)
            .unwrap_or_default()
            .as_bytes(),
    )?;
    let cur = dir_of(out, "");
    let old = dir_of(out, ".old");
    let _ = std::fs::remove_dir_all(&old);
    if cur.exists() {
        std::fs::rename(&cur, &old)?;
    }
    std::fs::rename(&new, &cur)?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// The newest complete checkpoint under `out`, if any.
pub fn find(out: &Path) -> Option<PathBuf> {
    [dir_of(out, ""), dir_of(out, ".old")]
        .into_iter()
        .find(|d| d.join("state.json").is_file())
}

/// The best-evaluation parameters stored with a checkpoint, if any.
pub fn load_best(dir: &Path) -> Result<Option<HashMap<String, Tensor>>> {
    let p = dir.join("best.safetensors");
    if !p.is_file() {
        return Ok(None);
    }
    Ok(Some(load_safetensors(&p)?.into_iter().collect()))
}

/// Restore parameters and optimiser state; returns the loop state.
pub fn load(dir: &Path, opt: &mut Optimizer) -> Result<LoopState> {
    let state: LoopState = serde_json::from_str(&std::fs::read_to_string(dir.join("state.json"))?)
        .map_err(|e| Error::file(dir.join("state.json"), e))?;
    let params: HashMap<String, Tensor> = load_safetensors(&dir.join("params.safetensors"))?
        .into_iter()
        .collect();
    let moments: HashMap<String, Tensor> = load_safetensors(&dir.join("optimizer.safetensors"))?
        .into_iter()
        .collect();
    for (name, v) in opt.vars().to_vec() {
        let p = params.get(&name).ok_or_else(|| {
            Error::file(
                dir,
                format!("checkpoint has no parameter `{name}` (a different run?)"),
            )
        })?;
        if p.dims() != v.dims() {
            return Err(Error::file(
                dir,
                format!(
                    "checkpoint parameter `{name}` has shape {:?}, the run has {:?}",
                    p.dims(),
                    v.dims()
                ),
            ));
        }
        v.set(&p.to_dtype(v.dtype())?)?;
        let m = moments
            .get(&format!("m.{name}"))
            .ok_or_else(|| Error::file(dir, format!("no optimiser state for `{name}`")))?;
        let entry = opt
            .state
            .get_mut(&name)
            .ok_or_else(|| Error::invalid(format!("no optimiser slot for {name}")))?;
        entry.0 = m.to_dtype(v.dtype())?;
        if entry.1.is_some() {
            let v2 = moments
                .get(&format!("v.{name}"))
                .ok_or_else(|| Error::file(dir, format!("no second moment for `{name}`")))?;
            entry.1 = Some(v2.to_dtype(v.dtype())?);
        }
    }
    opt.steps = state.optimizer_steps;
    Ok(state)
}
