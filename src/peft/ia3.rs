//! (IA)3 (Liu et al. 2022) with PEFT's semantics: a learned vector rescales the output of the
//! targeted layers (`ia3_l: [out, 1]`), or the input of the feed-forward ones (`[1, in]`).

use std::collections::HashMap;

use candle_core::{Device, Tensor, Var};
use rand::{rngs::StdRng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::config::check_exact;
use super::targets::{Selector, TargetModules};
use super::{linear_modules, normal, Delta};
use crate::params::ParamStore;
use crate::{Error, Result};

fn yes() -> bool {
    true
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ia3Config {
    pub target_modules: TargetModules,
    #[serde(default)]
    pub feedforward_modules: TargetModules,
    /// true: start at ones (the identity); false: N(0, 1) as PEFT's un-initialised vectors.
    #[serde(default = "yes")]
    pub init_ia3_weights: bool,
}

impl Ia3Config {
    /// `(module, is_feedforward, vector shape)` for every targeted module.
    fn modules(&self, base: &ParamStore) -> Result<Vec<(String, bool, Vec<usize>)>> {
        let sel = Selector::new(&self.target_modules, None, None)?;
        if let (TargetModules::List(t), TargetModules::List(f)) =
            (&self.target_modules, &self.feedforward_modules)
        {
            if let Some(x) = f.iter().find(|x| !t.contains(x)) {
                return Err(Error::invalid(format!(
                    "IA3: feedforward module `{x}` is not among target_modules {t:?}"
                )));
            }
        }
        // PEFT tests feed-forward membership with a plain suffix (no dot) for lists.
        let ff_regex = match &self.feedforward_modules {
            TargetModules::Regex(r) => Some(
                regex::Regex::new(&format!("^(?:{r})$"))
                    .map_err(|e| Error::invalid(format!("IA3 feedforward_modules regex: {e}")))?,
            ),
            TargetModules::List(_) => None,
        };
        let is_ff = |m: &str| match (&ff_regex, &self.feedforward_modules) {
            (Some(re), _) => re.is_match(m),
            (None, TargetModules::List(v)) => v.iter().any(|x| m.ends_with(x.as_str())),
            (None, TargetModules::Regex(_)) => false,
        };
        let out: Vec<_> = linear_modules(base)
            .into_iter()
            .filter(|(m, _, _)| sel.matches(m))
            .map(|(m, o, i)| {
                let is_ff = is_ff(&m);
                let shape = if is_ff { vec![1, i] } else { vec![o, 1] };
                (m, is_ff, shape)
            })
            .collect();
        if out.is_empty() {
            return Err(Error::invalid(format!(
                "IA3 target_modules {:?} match no linear layer",
                self.target_modules
            )));
        }
        Ok(out)
    }
}

#[derive(Debug)]
pub struct Ia3 {
    /// module -> is feed-forward
    modules: HashMap<String, bool>,
}

impl Ia3 {
    pub fn init_params(cfg: &Ia3Config, base: &ParamStore, seed: u64) -> Result<ParamStore> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut p = ParamStore::new();
        for (m, _, shape) in cfg.modules(base)? {
            let n: usize = shape.iter().product();
            let v = if cfg.init_ia3_weights {
                vec![1f32; n]
            } else {
                normal(&mut rng, n, 1.0)
            };
            p.insert_trainable(
                format!("{m}.ia3_l"),
                Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu)?)?,
            );
        }
        Ok(p)
    }

    pub fn build(cfg: &Ia3Config, base: &ParamStore, params: &ParamStore) -> Result<Self> {
        let mods = cfg.modules(base)?;
        let expected: Vec<_> = mods
            .iter()
            .map(|(m, _, s)| (format!("{m}.ia3_l"), s.clone()))
            .collect();
        check_exact("IA3", params, &expected)?;
        Ok(Ia3 {
            modules: mods.into_iter().map(|(m, ff, _)| (m, ff)).collect(),
        })
    }
}

impl Delta for Ia3 {
    fn method(&self) -> &'static str {
        "ia3"
    }

    fn linear_input(&self, module: &str, x: Tensor, params: &ParamStore) -> Result<Tensor> {
        if self.modules.get(module) != Some(&true) {
            return Ok(x);
        }
        let l = params
            .get(&format!("{module}.ia3_l"))?
            .flatten_all()?
            .to_dtype(x.dtype())?;
        Ok(x.broadcast_mul(&l)?)
    }

    fn linear(
        &self,
        module: &str,
        _x: &Tensor,
        _w: Option<&Tensor>,
        y: Tensor,
        params: &ParamStore,
    ) -> Result<Tensor> {
        if self.modules.get(module) != Some(&false) {
            return Ok(y);
        }
        let l = params
            .get(&format!("{module}.ia3_l"))?
            .flatten_all()?
            .to_dtype(y.dtype())?;
        Ok(y.broadcast_mul(&l)?)
    }

    fn mergeable(&self) -> bool {
        true
    }

    fn merge(&self, base: &mut ParamStore, params: &ParamStore) -> Result<()> {
        for (m, ff) in &self.modules {
            let l = params.get(&format!("{m}.ia3_l"))?.detach();
            let wn = format!("{m}.weight");
            let w = base.get(&wn)?;
            // [out, 1] scales rows; [1, in] scales columns: a broadcast multiply either way.
            let merged = w.broadcast_mul(&l.to_dtype(w.dtype())?)?;
            base.insert_frozen(wn, merged);
            let bn = format!("{m}.bias");
            if !ff {
                if let Some(b) = base.get_opt(&bn) {
                    let scaled = (b * l.flatten_all()?.to_dtype(b.dtype())?)?;
                    base.insert_frozen(bn, scaled);
                }
            }
        }
        Ok(())
    }

    fn unmerge(&self, merged: &mut ParamStore, params: &ParamStore) -> Result<()> {
        for (m, ff) in &self.modules {
            let l = params.get(&format!("{m}.ia3_l"))?.detach();
            if l.abs()?
                .flatten_all()?
                .min(0)?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?
                == 0.0
            {
                return Err(Error::invalid(format!(
                    "IA3 vector of {m} has a zero: the merge cannot be undone"
                )));
            }
            let wn = format!("{m}.weight");
            let w = merged.get(&wn)?;
            merged.insert_frozen(wn.clone(), w.broadcast_div(&l.to_dtype(w.dtype())?)?);
            let bn = format!("{m}.bias");
            if !ff {
                if let Some(b) = merged.get_opt(&bn) {
                    let unscaled = (b / l.flatten_all()?.to_dtype(b.dtype())?)?;
                    merged.insert_frozen(bn, unscaled);
                }
            }
        }
        Ok(())
    }
}
