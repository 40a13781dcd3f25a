//! TARP, task-adaptive reparameterisation (MLtD, Hou et al. 2022, Eq. 1): a targeted linear layer
//! computes `y = (Phi1 ⊙ W0 + Phi2) x` with low-rank `Phi`:
//! - `bilinear`: `Phi = U V^T`;
//! - `kronecker`: `Phi = sum_k H_k ⊗ (U_k V_k^T)` with `n` factors `H_k: [n, n]`;
//! - `dynamic`: `Phi(x) = U Sigma(x) V^T`, `Sigma(x) = reshape(S x + vec(I), r, r)` per token.
//!
//! The multiplicative branch is optional (off by default: additive only, as in the reference
//! code). Static variants parameterise it as `Phi1 = softplus(c + U1 V1^T)` with
//! `softplus(c) = 1` and `U1 = 0` at init, so it starts at exactly 1, and they merge exactly
//! into `W0`. The dynamic variant uses `Phi1(x) = 1 + U1 Sigma1(x) V1^T` (also exactly 1 at
//! init): linear in `Phi`, so `(Phi1(x) ⊙ W0) x` costs `r` extra frozen matmuls instead of one
//! weight matrix per token.

use std::collections::HashMap;

use candle_core::{Device, Tensor, Var, D};
use rand::{rngs::StdRng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::config::check_exact;
use super::targets::{Selector, TargetModules};
use super::{linear_modules, uniform, Delta};
use crate::ops::{frozen_linear, linear};
use crate::params::ParamStore;
use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TarpVariant {
    Bilinear,
    Kronecker,
    Dynamic,
}

fn eight() -> usize {
    8
}
fn two() -> usize {
    2
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TarpConfig {
    pub variant: TarpVariant,
    #[serde(default = "eight")]
    pub r: usize,
    pub target_modules: TargetModules,
    /// Also learn the multiplicative term `Phi1` (default: additive only).
    #[serde(default)]
    pub multiplicative: bool,
    /// Kronecker: the size `n` of the `H_k: [n, n]` factors (and their number).
    #[serde(default = "two")]
    pub kron_n: usize,
}

/// softplus(C) = 1.
const C: f64 = 0.541_324_854_612_918_1;

impl TarpConfig {
    fn modules(&self, base: &ParamStore) -> Result<Vec<(String, usize, usize)>> {
        if self.r == 0 {
            return Err(Error::invalid("TARP: r must be at least 1"));
        }
        let sel = Selector::new(&self.target_modules, None, None)?;
        let mods: Vec<_> = linear_modules(base)
            .into_iter()
            .filter(|(m, _, _)| sel.matches(m))
            .collect();
        if mods.is_empty() {
            return Err(Error::invalid(format!(
                "TARP target_modules {:?} match no linear layer",
                self.target_modules
            )));
        }
        if self.variant == TarpVariant::Kronecker {
            let n = self.kron_n;
            if let Some((m, o, i)) = mods
                .iter()
                .find(|(_, o, i)| n == 0 || o % n != 0 || i % n != 0)
            {
                return Err(Error::invalid(format!(
                    "TARP kronecker: {m} is {o} x {i}, not divisible by kron_n {n}"
                )));
            }
        }
        Ok(mods)
    }

    /// `(name, shape, init)` of every parameter; init: 0 zeros, 1 small uniform, 2 identity-ish.
    fn expected(&self, base: &ParamStore) -> Result<Vec<(String, Vec<usize>, u8)>> {
        let r = self.r;
        let mut e = vec![];
        let branches: &[&str] = if self.multiplicative {
            &["2", "1"]
        } else {
            &["2"]
        };
        for (m, o, i) in self.modules(base)? {
            for j in branches {
                let p = format!("{m}.tarp");
                match self.variant {
                    TarpVariant::Bilinear => {
                        e.push((format!("{p}.U{j}"), vec![o, r], 0));
                        e.push((format!("{p}.V{j}"), vec![i, r], 1));
                    }
                    TarpVariant::Kronecker => {
                        let n = self.kron_n;
                        e.push((format!("{p}.H{j}"), vec![n, n, n], 1));
                        e.push((format!("{p}.U{j}"), vec![n, o / n, r], 0));
                        e.push((format!("{p}.V{j}"), vec![n, i / n, r], 1));
                    }
                    TarpVariant::Dynamic => {
                        e.push((format!("{p}.U{j}"), vec![o, r], 0));
                        e.push((format!("{p}.V{j}"), vec![i, r], 1));
                        e.push((format!("{p}.S{j}.weight"), vec![r * r, i], 1));
                        e.push((format!("{p}.S{j}.bias"), vec![r * r], 2));
                    }
                }
            }
        }
        Ok(e)
    }
}

#[derive(Debug)]
pub struct Tarp {
    cfg: TarpConfig,
    modules: HashMap<String, (usize, usize)>,
}

/// `a ⊗ b` for 2-d tensors.
fn kron(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (n, m) = a.dims2()?;
    let (p, q) = b.dims2()?;
    let a4 = a.reshape((n, 1, m, 1))?;
    let b4 = b.reshape((1, p, 1, q))?;
    Ok(a4.broadcast_mul(&b4)?.reshape((n * p, m * q))?)
}

impl Tarp {
    pub fn init_params(cfg: &TarpConfig, base: &ParamStore, seed: u64) -> Result<ParamStore> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut p = ParamStore::new();
        for (name, shape, init) in cfg.expected(base)? {
            let n: usize = shape.iter().product();
            let v = match init {
                0 => vec![0.0; n],
                1 => {
                    let fan_in = *shape.get(shape.len().saturating_sub(2)).unwrap_or(&1);
                    uniform(&mut rng, n, 1.0 / (fan_in as f64).sqrt())
                }
                _ => {
                    let r = (n as f64).sqrt() as usize;
                    (0..n)
                        .map(|k| if k / r == k % r { 1.0 } else { 0.0 })
                        .collect()
                }
            };
            p.insert_trainable(
                name,
                Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu)?)?,
            );
        }
        Ok(p)
    }

    pub fn build(cfg: &TarpConfig, base: &ParamStore, params: &ParamStore) -> Result<Self> {
        let expected: Vec<_> = cfg
            .expected(base)?
            .into_iter()
            .map(|(n, s, _)| (n, s))
            .collect();
        check_exact("TARP", params, &expected)?;
        Ok(Tarp {
            cfg: cfg.clone(),
            modules: cfg
                .modules(base)?
                .into_iter()
                .map(|(m, o, i)| (m, (o, i)))
                .collect(),
        })
    }

    /// The static `Phi_j: [out, in]` of `module` (bilinear or Kronecker).
    fn phi(&self, module: &str, j: &str, params: &ParamStore) -> Result<Tensor> {
        let p = format!("{module}.tarp");
        let u = params.get(&format!("{p}.U{j}"))?;
        let v = params.get(&format!("{p}.V{j}"))?;
        match self.cfg.variant {
            TarpVariant::Bilinear => Ok(u.matmul(&v.t()?)?),
            TarpVariant::Kronecker => {
                let h = params.get(&format!("{p}.H{j}"))?;
                let mut acc: Option<Tensor> = None;
                for k in 0..self.cfg.kron_n {
                    let uk = u.get(k)?;
                    let vk = v.get(k)?;
                    let term = kron(&h.get(k)?, &uk.matmul(&vk.t()?)?)?;
                    acc = Some(match acc {
                        Some(a) => (a + term)?,
                        None => term,
                    });
                }
                acc.ok_or_else(|| Error::invalid("TARP kronecker: kron_n is 0"))
            }
            TarpVariant::Dynamic => Err(Error::invalid("dynamic TARP has no static Phi")),
        }
    }

    /// `[N, r, r]`: `Sigma_j(x)` for every token of `x: [N, in]`.
    fn sigma(&self, module: &str, j: &str, x: &Tensor, params: &ParamStore) -> Result<Tensor> {
        let p = format!("{module}.tarp");
        let s = linear(
            x,
            params.get(&format!("{p}.S{j}.weight"))?,
            Some(params.get(&format!("{p}.S{j}.bias"))?),
        )?;
        let r = self.cfg.r;
        Ok(s.reshape(((), r, r))?)
    }

    fn softplus(t: &Tensor) -> Result<Tensor> {
        // log(1 + e^t), stable for large t: max(t, 0) + log(1 + e^-|t|)
        Ok((t.relu()? + ((t.abs()?.neg()?.exp()? + 1.0)?.log()?))?)
    }
}

impl Delta for Tarp {
    fn method(&self) -> &'static str {
        "tarp"
    }

    fn linear(
        &self,
        module: &str,
        x: &Tensor,
        w0: Option<&Tensor>,
        y: Tensor,
        params: &ParamStore,
    ) -> Result<Tensor> {
        let Some(&(out, inp)) = self.modules.get(module) else {
            return Ok(y);
        };
        let dense_w0 = || {
            w0.ok_or_else(|| {
                Error::invalid(format!(
                    "TARP's multiplicative term reads the base weight of `{module}`, which is \
                     stored quantized: load the base with --base-dtype f32 or bf16, or use an \
                     additive TARP (multiplicative = false)"
                ))
            })
        };
        let dims = x.dims().to_vec();
        let x2 = x.reshape(((), inp))?;
        let mut y2 = y.reshape(((), out))?;
        match self.cfg.variant {
            TarpVariant::Bilinear | TarpVariant::Kronecker => {
                let phi2 = self.phi(module, "2", params)?;
                y2 = (y2 + linear(&x2, &phi2, None)?)?;
                if self.cfg.multiplicative {
                    let phi1 = Self::softplus(&(self.phi(module, "1", params)? + C)?)?;
                    // (Phi1 ⊙ W0) x = W0 x + ((Phi1 - 1) ⊙ W0) x; y already holds W0 x (+ b).
                    let extra = ((phi1 - 1.0)? * dense_w0()?.to_dtype(x.dtype())?)?;
                    y2 = (y2 + linear(&x2, &extra, None)?)?;
                }
            }
            TarpVariant::Dynamic => {
                let p = format!("{module}.tarp");
                // U Sigma(x) V^T x, token by token: z = x V, w = Sigma(x) z, then U w.
                let branch = |j: &str| -> Result<(Tensor, Tensor, Tensor)> {
                    let u = params.get(&format!("{p}.U{j}"))?.clone();
                    let v = params.get(&format!("{p}.V{j}"))?.clone();
                    let s = self.sigma(module, j, &x2, params)?;
                    Ok((u, v, s))
                };
                let (u2, v2, s2) = branch("2")?;
                let z = x2.matmul(&v2)?; // [N, r]
                let w = s2.matmul(&z.unsqueeze(D::Minus1)?)?.squeeze(D::Minus1)?; // [N, r]
                y2 = (y2 + w.matmul(&u2.t()?)?)?;
                if self.cfg.multiplicative {
                    let (u1, v1, s1) = branch("1")?;
                    // ((U S V^T) ⊙ W0) x = sum_i U[:, i] ⊙ (W0 (x ⊙ m_i)), m_i = V S[i, :]^T per token.
                    let m = s1.matmul(
                        &v1.t()?
                            .unsqueeze(0)?
                            .broadcast_as((x2.dim(0)?, self.cfg.r, inp))?
                            .contiguous()?,
                    )?; // [N, r, in]
                    for i in 0..self.cfg.r {
                        let xi = (&x2 * m.narrow(1, i, 1)?.squeeze(1)?)?;
                        let wi = frozen_linear(&xi, dense_w0()?)?;
                        y2 = (y2 + wi.broadcast_mul(&u1.narrow(1, i, 1)?.t()?)?)?;
                    }
                }
            }
        }
        let mut out_dims = dims;
        if let Some(l) = out_dims.last_mut() {
            *l = out;
        }
        Ok(y2.reshape(out_dims)?)
    }

    fn mergeable(&self) -> bool {
        self.cfg.variant != TarpVariant::Dynamic
    }

    fn merge(&self, base: &mut ParamStore, params: &ParamStore) -> Result<()> {
        if self.cfg.variant == TarpVariant::Dynamic {
            return Err(Error::invalid(
                "dynamic TARP depends on the input: it cannot be merged into the base model",
            ));
        }
        for m in self.modules.keys() {
            let wn = format!("{m}.weight");
            let w0 = base.get(&wn)?.clone();
            let mut w = (&w0 + self.phi(m, "2", params)?.to_dtype(w0.dtype())?)?;
            if self.cfg.multiplicative {
                let phi1 =
                    Self::softplus(&(self.phi(m, "1", params)? + C)?)?.to_dtype(w0.dtype())?;
                w = ((phi1 - 1.0)?.mul(&w0)? + w)?;
            }
            base.insert_frozen(wn, w.detach());
        }
        Ok(())
    }

    fn unmerge(&self, merged: &mut ParamStore, params: &ParamStore) -> Result<()> {
        if self.cfg.variant == TarpVariant::Dynamic {
            return self.merge(merged, params);
        }
        for m in self.modules.keys() {
            let wn = format!("{m}.weight");
            let w = merged.get(&wn)?.clone();
            // W = Phi1 ⊙ W0 + Phi2 with Phi1 = softplus(.) > 0, so W0 = (W - Phi2) / Phi1.
            let mut w0 = (&w - self.phi(m, "2", params)?.to_dtype(w.dtype())?)?;
            if self.cfg.multiplicative {
                let phi1 =
                    Self::softplus(&(self.phi(m, "1", params)? + C)?)?.to_dtype(w.dtype())?;
                w0 = (w0 / phi1)?;
            }
            merged.insert_frozen(wn, w0.detach());
        }
        Ok(())
    }
}
