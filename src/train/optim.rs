//! Optimisers over named `Var`s with state that can be saved and restored exactly:
//! AdamW (decoupled weight decay, Loshchilov & Hutter) and SGD with momentum.

use std::collections::HashMap;

use candle_core::{backprop::GradStore, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum OptimizerConfig {
    AdamW {
        #[serde(default = "b1")]
        beta1: f64,
        #[serde(default = "b2")]
        beta2: f64,
        #[serde(default = "eps")]
        eps: f64,
        #[serde(default)]
        weight_decay: f64,
    },
    Sgd {
        #[serde(default)]
        momentum: f64,
        #[serde(default)]
        weight_decay: f64,
    },
}

fn b1() -> f64 {
    0.9
}
fn b2() -> f64 {
    0.999
}
fn eps() -> f64 {
    1e-8
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

pub struct Optimizer {
    cfg: OptimizerConfig,
    vars: Vec<(String, Var)>,
    /// Per variable: first moment (AdamW) or velocity (SGD), and second moment (AdamW).
    pub(crate) state: HashMap<String, (Tensor, Option<Tensor>)>,
    pub(crate) steps: usize,
}

impl Optimizer {
    pub fn new(cfg: OptimizerConfig, vars: Vec<(String, Var)>) -> Result<Self> {
        if vars.is_empty() {
            return Err(Error::invalid("nothing to train: no trainable parameters"));
        }
        let mut state = HashMap::new();
        for (n, v) in &vars {
            let z = v.zeros_like()?;
            let second = matches!(cfg, OptimizerConfig::AdamW { .. }).then(|| z.clone());
            state.insert(n.clone(), (z, second));
        }
        Ok(Self {
            cfg,
            vars,
            state,
            steps: 0,
        })
    }

    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// One update with learning rate `lr` from `grads` (variables without a gradient are left
    /// alone, their state unchanged).
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        let gs: Vec<Option<Tensor>> = self
            .vars
            .iter()
            .map(|(_, v)| grads.get(v.as_tensor()).cloned())
            .collect();
        self.step_with(&gs, lr)
    }

    /// One update from gradients aligned with [`Optimizer::vars`] (`None`: left alone). For
    /// gradients that did not come from one backward pass (meta-gradients averaged over episodes).
    pub fn step_with(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        if grads.len() != self.vars.len() {
            return Err(Error::invalid(format!(
                "{} gradients for {} variables",
                grads.len(),
                self.vars.len()
            )));
        }
        self.steps += 1;
        let t = self.steps as i32;
        for ((name, var), g) in self.vars.iter().zip(grads) {
            let Some(g) = g else {
                continue;
            };
            let g = g.detach();
            let (m, v) = self
                .state
                .get_mut(name)
                .ok_or_else(|| Error::invalid(format!("no optimiser state for {name}")))?;
            let w = var.as_tensor().detach();
            match self.cfg {
                OptimizerConfig::AdamW {
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                } => {
                    let v2 = v
                        .as_mut()
                        .ok_or_else(|| Error::invalid("AdamW state without second moment"))?;
                    *m = ((&*m * beta1)? + (&g * (1.0 - beta1))?)?;
                    *v2 = ((&*v2 * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
                    let mh = (&*m / (1.0 - beta1.powi(t)))?;
                    let vh = (&*v2 / (1.0 - beta2.powi(t)))?;
                    let update = (mh / (vh.sqrt()? + eps)?)?;
                    let decayed = (&w * (1.0 - lr * weight_decay))?;
                    var.set(&(decayed - (update * lr)?)?)?;
                }
                OptimizerConfig::Sgd {
                    momentum,
                    weight_decay,
                } => {
                    let g = if weight_decay > 0.0 {
                        (g + (&w * weight_decay)?)?
                    } else {
                        g
                    };
                    *m = if momentum > 0.0 {
                        ((&*m * momentum)? + &g)?
                    } else {
                        g
                    };
                    var.set(&(w - (&*m * lr)?)?)?;
                }
            }
        }
        Ok(())
    }
}

/// Scale `grads` in place so their global L2 norm is at most `max_norm`; returns the norm before.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[(String, Var)], max_norm: f64) -> Result<f64> {
    let mut gs: Vec<Option<Tensor>> = vars
        .iter()
        .map(|(_, v)| grads.get(v.as_tensor()).cloned())
        .collect();
    let norm = clip_grad_norm_slice(&mut gs, max_norm)?;
    for ((_, v), g) in vars.iter().zip(gs) {
        if let Some(g) = g {
            grads.insert(v.as_tensor(), g);
        }
    }
    Ok(norm)
}

/// [`clip_grad_norm`] for gradients held in a slice.
pub fn clip_grad_norm_slice(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64> {
    let mut total = 0.0;
    for g in grads.iter().flatten() {
        total += g
            .sqr()?
            .sum_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
    }
    let norm = total.sqrt();
    if norm > max_norm && norm.is_finite() {
        let s = max_norm / (norm + 1e-6);
        for g in grads.iter_mut().flatten() {
            *g = (&*g * s)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn adamw_first_step_matches_the_formula() -> Result<()> {
        // After one step, m_hat = g and v_hat = g^2, so w -= lr * (g / (|g| + eps)) + lr*wd*w.
        let v = Var::from_tensor(&Tensor::new(&[1.0f64, -2.0], &Device::Cpu)?)?;
        let mut o = Optimizer::new(
            OptimizerConfig::AdamW {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.1,
            },
            vec![("w".into(), v.clone())],
        )?;
        let loss = (v.as_tensor().sqr()?.sum_all()? * 0.5)?; // grad = w
        o.step(&loss.backward()?, 0.01)?;
        let got = v.as_tensor().to_vec1::<f64>()?;
        let want = [
            1.0 * (1.0 - 0.001) - 0.01 * (1.0 / (1.0 + 1e-8)),
            -2.0 * (1.0 - 0.001) + 0.01 * (2.0 / (2.0 + 1e-8)),
        ];
        for (a, b) in got.iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
        Ok(())
    }

    #[test]
    fn sgd_momentum_and_clipping() -> Result<()> {
        let v = Var::from_tensor(&Tensor::new(&[3.0f64, 4.0], &Device::Cpu)?)?;
        let vars = vec![("w".to_string(), v.clone())];
        let mut o = Optimizer::new(
            OptimizerConfig::Sgd {
                momentum: 0.5,
                weight_decay: 0.0,
            },
            vars.clone(),
        )?;
        let loss = (v.as_tensor().sqr()?.sum_all()? * 0.5)?; // grad = w = [3, 4], norm 5
        let mut g = loss.backward()?;
        let n = clip_grad_norm(&mut g, &vars, 1.0)?;
        assert!((n - 5.0).abs() < 1e-12);
        o.step(&g, 1.0)?;
        let got = v.as_tensor().to_vec1::<f64>()?;
        assert!(
            (got[0] - (3.0 - 0.6)).abs() < 1e-5 && (got[1] - (4.0 - 0.8)).abs() < 1e-5,
            "{got:?}"
        );
        Ok(())
    }
}
