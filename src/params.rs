//! A functional parameter store: an ordered map from a stable (Hugging Face style) name to a tensor,
//! with the trainable entries held as `Var`s. Models read their weights from a store passed to each
//! call, so meta-learning "fast weights" are just another store and no model object is ever mutated.

use candle_core::{DType, Tensor, Var};
use indexmap::IndexMap;

use crate::error::{Error, Result};
use crate::ops::QuantizedWeight;

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
    /// Frozen weights kept as GGUF blocks (a quantized base): read only by the ops that take them
    /// (`ops::quantized_linear`, embedding rows); `get` refuses them with a clear error.
    quantized: IndexMap<String, QuantizedWeight>,
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
        if let Some(q) = self.quantized.get(name) {
            return Err(Error::invalid(format!(
                "parameter `{name}` is stored {} and this step needs it dense: load the \
                 base in f32 or bf16 (`--base-dtype`, `--weights`)",
                q.kind()
            )));
        }
        self.entries
            .get(name)
            .map(Param::tensor)
            .ok_or_else(|| Error::invalid(format!("parameter `{name}` is not in the store")))
    }

    /// Keep a frozen weight as GGUF blocks (replaces a dense entry of the same name).
    pub fn insert_quantized(&mut self, name: impl Into<String>, w: QuantizedWeight) {
        let name = name.into();
        self.entries.shift_remove(&name);
        self.quantized.insert(name, w);
    }

    /// The quantized weight stored under `name`, if it is one.
    pub fn quantized(&self, name: &str) -> Option<&QuantizedWeight> {
        self.quantized.get(name)
    }

    /// Whether any weight is stored quantized.
    pub fn has_quantized(&self) -> bool {
        !self.quantized.is_empty()
    }

    /// Names and weights of the quantized entries.
    pub fn quantized_entries(&self) -> impl Iterator<Item = (&str, &QuantizedWeight)> {
        self.quantized.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// A store whose quantized entries are dense f32 tensors again (exports, merges).
    pub fn dequantized(&self) -> Result<Self> {
        let mut out = self.clone();
        for (k, q) in std::mem::take(&mut out.quantized) {
            out.insert_frozen(k, q.dequantize()?);
        }
        Ok(out)
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
        self.entries.contains_key(name) || self.quantized.contains_key(name)
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
        let q: usize = self
            .quantized
            .values()
            .map(|q| q.dims().0 * q.dims().1)
            .sum();
        self.entries
            .values()
            .map(|p| p.tensor().elem_count())
            .sum::<usize>()
            + q
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

    /// A copy with every frozen matrix (2-D: linear weights, embeddings) stored in `dtype`, for a
    /// half-precision frozen base. Vectors (norms, biases) and trainable entries are unchanged.
    pub fn frozen_matrices_to(&self, dtype: DType) -> Result<Self> {
        let mut out = ParamStore::new();
        for (k, p) in &self.entries {
            match p {
                Param::Frozen(t) if t.rank() == 2 => {
                    out.insert_frozen(k.clone(), t.to_dtype(dtype)?)
                }
                p => out.insert(k.clone(), p.clone()),
            }
        }
        out.quantized = self.quantized.clone();
        Ok(out)
    }

    /// A copy with every frozen matrix whose rows are whole blocks of `dtype` kept quantized
    /// (requantizing a dense base, e.g. to Q8_0); other entries are unchanged.
    pub fn quantize_matrices(&self, dtype: candle_core::quantized::GgmlDType) -> Result<Self> {
        let mut out = ParamStore::new();
        for (k, p) in &self.entries {
            match p {
                Param::Frozen(t)
                    if t.rank() == 2 && t.dim(1)?.is_multiple_of(dtype.block_size()) =>
                {
                    out.insert_quantized(k.clone(), QuantizedWeight::quantize(t, dtype)?)
                }
                p => out.insert(k.clone(), p.clone()),
            }
        }
        for (k, q) in &self.quantized {
            out.quantized.insert(k.clone(), q.clone());
        }
        Ok(out)
    }

    /// The store with every frozen matrix (dense or quantized) kept as f32 panels, the matmul
    /// kernel's own layout (the inference layout: the f32 values, no per-product transposes of
    /// the weights). Other entries are unchanged.
    /// Taken by value: each dense matrix is dropped once packed, so memory never holds the whole
    /// base twice.
    pub fn into_packed(self) -> Result<Self> {
        let mut out = ParamStore::new();
        for (k, p) in self.entries {
            match p {
                Param::Frozen(t) if t.rank() == 2 => {
                    let packed = QuantizedWeight::panels(&t)?;
                    out.insert_quantized(k, packed)
                }
                p => out.insert(k, p),
            }
        }
        for (k, q) in self.quantized {
            let packed = q.to_panels()?;
            out.quantized.insert(k, packed);
        }
        Ok(out)
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
