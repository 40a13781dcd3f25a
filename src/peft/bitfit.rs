//! BitFit (Ben Zaken et al. 2022): train only the bias terms. Linear layers without a bias (Llama)
//! get one, initialised at zero, so the method applies to every architecture.

use std::collections::HashSet;

use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::config::check_exact;
use super::targets::{Selector, TargetModules};
use super::{linear_modules, Delta};
use crate::params::ParamStore;
use crate::{Error, Result};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BitFitConfig {
    /// Which linear modules get a trainable bias (default: all of them).
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
}

impl BitFitConfig {
    fn modules(&self, base: &ParamStore) -> Result<Vec<(String, usize)>> {
        let sel = match &self.target_modules {
            Some(t) => Some(Selector::new(t, None, None)?),
            None => None,
        };
        let out: Vec<_> = linear_modules(base)
            .into_iter()
            .filter(|(m, _, _)| sel.as_ref().is_none_or(|s| s.matches(m)))
            .map(|(m, o, _)| (m, o))
            .collect();
        if out.is_empty() {
            return Err(Error::invalid("BitFit: no linear layer selected"));
        }
        Ok(out)
    }
}

#[derive(Debug)]
pub struct BitFit {
    modules: HashSet<String>,
}

impl BitFit {
    pub fn init_params(cfg: &BitFitConfig, base: &ParamStore) -> Result<ParamStore> {
        let mut p = ParamStore::new();
        for (m, o) in cfg.modules(base)? {
            let name = format!("{m}.bias");
            let b = match base.get_opt(&name) {
                Some(b) => b.to_dtype(candle_core::DType::F32)?,
                None => Tensor::zeros(o, candle_core::DType::F32, &Device::Cpu)?,
            };
            p.insert_trainable(name, Var::from_tensor(&b)?);
        }
        Ok(p)
    }

    pub fn build(cfg: &BitFitConfig, base: &ParamStore, params: &ParamStore) -> Result<Self> {
        let mods = cfg.modules(base)?;
        let expected: Vec<_> = mods
            .iter()
            .map(|(m, o)| (format!("{m}.bias"), vec![*o]))
            .collect();
        check_exact("BitFit", params, &expected)?;
        Ok(BitFit {
            modules: mods.into_iter().map(|(m, _)| m).collect(),
        })
    }
}

impl Delta for BitFit {
    fn method(&self) -> &'static str {
        "bitfit"
    }

    fn weight(
        &self,
        name: &str,
        _base: Option<&Tensor>,
        params: &ParamStore,
    ) -> Result<Option<Tensor>> {
        match name.strip_suffix(".bias") {
            Some(m) if self.modules.contains(m) => Ok(Some(params.get(name)?.clone())),
            _ => Ok(None),
        }
    }

    fn mergeable(&self) -> bool {
        true
    }

    fn merge(&self, base: &mut ParamStore, params: &ParamStore) -> Result<()> {
        for m in &self.modules {
            let name = format!("{m}.bias");
            base.insert_frozen(name.clone(), params.get(&name)?.detach());
        }
        Ok(())
    }
}
