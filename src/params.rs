//! A functional parameter store: an ordered map from a stable (Hugging Face style) name to a tensor,
//! with the trainable entries held as `Var`s. Models read their weights from a store passed to each
//! call, so meta-learning "fast weights" are just another store and no model object is ever mutated.

use candle_core::{DType, Tensor, Var};
use indexmap::IndexMap;

use crate::error::{Error, Result};

#[derive(Clone, Debug)]
pub enum Param {
    Frozen(Tensor),
    Trainable(Var),
}

impl Param {
    pub fn tensor(&self) -> &Tensor {
        match self {
            Param::Frozen(t) => t,
            Param::Trainable(v) => v.as_tensor(),
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct ParamStore {
    entries: IndexMap<String, Param>,
    /// Weights kept in a GGUF block format for inference (no gradient, no PEFT deltas).
    quantized: IndexMap<String, std::sync::Arc<crate::quant::QWeight>>,
}

impl ParamStore {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert_frozen(&mut self, name: impl Into<String>, t: Tensor) {
        self.entries.insert(name.into(), Param::Frozen(t));
    }

    pub fn insert_trainable(&mut self, name: impl Into<String>, v: Var) {
        self.entries.insert(name.into(), Param::Trainable(v));
    }

    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.entries.get(name).map(Param::tensor).ok_or_else(|| {
            if self.quantized.contains_key(name) {
                Error::invalid(format!(
                    "parameter `{name}` is stored quantized (inference only): load the model \
                     in f32 to train or adapt it"
                ))
            } else {
                Error::invalid(format!("parameter `{name}` is not in the store"))
            }
        })
    }

    /// Store a quantized weight (inference only).
    pub fn insert_quantized(&mut self, name: impl Into<String>, w: crate::quant::QWeight) {
        self.quantized.insert(name.into(), std::sync::Arc::new(w));
    }

    /// A quantized weight, when `name` is stored that way.
    pub fn quantized(&self, name: &str) -> Option<&crate::quant::QWeight> {
        self.quantized.get(name).map(|w| w.as_ref())
    }

    /// Whether any weight is stored quantized.
    pub fn has_quantized(&self) -> bool {
        !self.quantized.is_empty()
    }

    /// The entry itself (frozen tensor or trainable `Var`).
    pub fn param(&self, name: &str) -> Option<&Param> {
        self.entries.get(name)
    }

    pub fn insert(&mut self, name: impl Into<String>, p: Param) {
        self.entries.insert(name.into(), p);
    }

    /// The same tensors with no gradient tracking: every entry frozen and detached (shares
    /// storage, copies nothing).
    pub fn detached(&self) -> Self {
        let mut out = ParamStore::new();
        for (k, p) in &self.entries {
            out.insert_frozen(k.clone(), p.tensor().detach());
        }
        out.quantized = self.quantized.clone();
        out
    }

    pub fn get_opt(&self, name: &str) -> Option<&Tensor> {
        self.entries.get(name).map(Param::tensor)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    pub fn is_trainable(&self, name: &str) -> bool {
        matches!(self.entries.get(name), Some(Param::Trainable(_)))
    }

    /// Turn frozen entries into trainable `Var`s (full fine-tuning, BitFit, ...).
    pub fn make_trainable(&mut self, pred: impl Fn(&str) -> bool) -> Result<usize> {
        let mut n = 0;
        for (name, p) in self.entries.iter_mut() {
            if let Param::Frozen(t) = p {
                if pred(name) {
                    *p = Param::Trainable(Var::from_tensor(t)?);
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Param)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// The trainable entries, in insertion order.
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.entries
            .iter()
            .filter_map(|(k, p)| match p {
                Param::Trainable(v) => Some((k.clone(), v.clone())),
                Param::Frozen(_) => None,
            })
            .collect()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn num_params(&self) -> usize {
        self.entries.values().map(|p| p.tensor().elem_count()).sum()
    }

    pub fn num_trainable(&self) -> usize {
        self.entries
            .values()
            .filter(|p| matches!(p, Param::Trainable(_)))
            .map(|p| p.tensor().elem_count())
            .sum()
    }

    /// The dtypes present, with the number of parameters of each.
    pub fn dtype_counts(&self) -> Vec<(DType, usize)> {
        let mut out: Vec<(DType, usize)> = Vec::new();
        for p in self.entries.values() {
            let t = p.tensor();
            match out.iter_mut().find(|(d, _)| *d == t.dtype()) {
                Some((_, n)) => *n += t.elem_count(),
                None => out.push((t.dtype(), t.elem_count())),
            }
        }
        out
    }

    /// A copy of the store with every tensor converted to `dtype` (trainable entries stay trainable).
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        let mut out = ParamStore::new();
        for (k, p) in &self.entries {
            match p {
                Param::Frozen(t) => out.insert_frozen(k.clone(), t.to_dtype(dtype)?),
                Param::Trainable(v) => {
                    out.insert_trainable(k.clone(), Var::from_tensor(&v.to_dtype(dtype)?)?)
                }
            }
        }
        out.quantized = self.quantized.clone();
        Ok(out)
    }
}
