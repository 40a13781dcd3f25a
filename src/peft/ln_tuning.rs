//! LayerNorm tuning: train only the normalisation layers' weights (and biases, for LayerNorm),
//! starting from the base values.

use std::collections::HashSet;

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use super::config::check_exact;
use super::Delta;
use crate::params::ParamStore;
use crate::{Error, Result};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LnTuningConfig {
    /// Only norms whose name contains one of these strings (default: every norm).
    #[serde(default)]
    pub target_modules: Option<Vec<String>>,
}

impl LnTuningConfig {
    fn tensors(&self, base: &ParamStore) -> Result<Vec<(String, Vec<usize>)>> {
        let out: Vec<_> = base
            .iter()
            .filter(|(n, p)| {
                let is_norm =
                    (n.contains("norm.") || n.contains("LayerNorm.")) && p.tensor().rank() == 1;
                let selected = self
                    .target_modules
                    .as_ref()
                    .is_none_or(|t| t.iter().any(|s| n.contains(s.as_str())));
                is_norm && selected
            })
            .map(|(n, p)| (n.to_string(), p.tensor().dims().to_vec()))
            .collect();
        if out.is_empty() {
            return Err(Error::invalid("LN tuning: no normalisation layer selected"));
        }
        Ok(out)
    }
}

#[derive(Debug)]
pub struct LnTuning {
    names: HashSet<String>,
}

impl LnTuning {
    pub fn init_params(cfg: &LnTuningConfig, base: &ParamStore) -> Result<ParamStore> {
        let mut p = ParamStore::new();
        for (n, _) in cfg.tensors(base)? {
            let t = base.get(&n)?.to_dtype(candle_core::DType::F32)?;
            p.insert_trainable(n, Var::from_tensor(&t)?);
        }
        Ok(p)
    }

    pub fn build(cfg: &LnTuningConfig, base: &ParamStore, params: &ParamStore) -> Result<Self> {
        let expected = cfg.tensors(base)?;
        check_exact("LN tuning", params, &expected)?;
        Ok(LnTuning {
            names: expected.into_iter().map(|(n, _)| n).collect(),
        })
    }
}

impl Delta for LnTuning {
    fn method(&self) -> &'static str {
        "ln_tuning"
    }

    fn weight(
        &self,
        name: &str,
        _base: Option<&Tensor>,
        params: &ParamStore,
    ) -> Result<Option<Tensor>> {
        if self.names.contains(name) {
            Ok(Some(params.get(name)?.clone()))
        } else {
            Ok(None)
        }
    }

    fn mergeable(&self) -> bool {
        true
    }

    fn merge(&self, base: &mut ParamStore, params: &ParamStore) -> Result<()> {
        for n in &self.names {
            base.insert_frozen(n.clone(), params.get(n)?.detach());
        }
        Ok(())
    }
}
