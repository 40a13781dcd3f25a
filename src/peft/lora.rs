//! LoRA (Hu et al. 2021) with Hugging Face PEFT's semantics:
//! `y = x W^T + b + s * dropout(x) A^T B^T` with `A: [r, in]`, `B: [out, r]`,
//! `s = alpha / r` (or `alpha / sqrt(r)` with rsLoRA); `rank_pattern` / `alpha_pattern` override
//! `r` / `alpha` per module. Init as PEFT: `A` Kaiming-uniform(a = sqrt 5), `B` zero; `gaussian`:
//! `A ~ N(0, 1/r)`; `init_lora_weights = false`: both keep `nn.Linear`'s default init, so the delta
//! is active from the start. `bias = "all" | "lora_only"` also trains the layers' existing biases.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use candle_core::{Device, Tensor, Var};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::config::check_exact;
use super::targets::{pattern_value, LayerSelection, Selector, TargetModules};
use super::{linear_modules, normal, uniform, Delta};
use crate::ops::linear;
use crate::params::ParamStore;
use crate::{Error, Result};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LoraInit {
    Default(bool),
    Named(String),
}

impl Default for LoraInit {
    fn default() -> Self {
        LoraInit::Default(true)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LayersPattern {
    One(String),
    Many(Vec<String>),
}

fn default_bias() -> String {
    "none".into()
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub target_modules: TargetModules,
    #[serde(default)]
    pub lora_dropout: f64,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
    #[serde(default = "default_bias")]
    pub bias: String,
    #[serde(default)]
    pub init_lora_weights: LoraInit,
    #[serde(default)]
    pub layers_to_transform: Option<LayerSelection>,
    #[serde(default)]
    pub layers_pattern: Option<LayersPattern>,
}

impl LoraConfig {
    /// A plain config: rank `r`, alpha `alpha`, the given module names.
    pub fn new(r: usize, alpha: f64, targets: &[&str]) -> Self {
        LoraConfig {
            r,
            lora_alpha: alpha,
            target_modules: TargetModules::List(targets.iter().map(|s| s.to_string()).collect()),
            lora_dropout: 0.0,
            use_rslora: false,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            bias: "none".into(),
            init_lora_weights: LoraInit::default(),
            layers_to_transform: None,
            layers_pattern: None,
        }
    }

    fn selector(&self) -> Result<Selector> {
        let pats = self.layers_pattern.as_ref().map(|p| match p {
            LayersPattern::One(s) => vec![s.clone()],
            LayersPattern::Many(v) => v.clone(),
        });
        Selector::new(
            &self.target_modules,
            self.layers_to_transform.as_ref(),
            pats.as_deref(),
        )
    }

    fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(Error::invalid("LoRA: r must be at least 1"));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(Error::invalid("LoRA: lora_dropout must be in [0, 1)"));
        }
        if !["none", "all", "lora_only"].contains(&self.bias.as_str()) {
            return Err(Error::invalid(format!(
                "LoRA: bias `{}` is not one of none, all, lora_only",
                self.bias
            )));
        }
        Ok(())
    }

    /// Rank and scale of `module`.
    pub fn rank_and_scale(&self, module: &str) -> Result<(usize, f64)> {
        let r = pattern_value(&self.rank_pattern, module)?.unwrap_or(self.r);
        let alpha = pattern_value(&self.alpha_pattern, module)?.unwrap_or(self.lora_alpha);
        let scale = if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        };
        Ok((r, scale))
    }

    /// The adapted modules of `base`: `(module, out, in, rank, scale)`.
    pub fn modules(&self, base: &ParamStore) -> Result<Vec<LoraModule>> {
        self.validate()?;
        let sel = self.selector()?;
        let mut out = vec![];
        for (m, o, i) in linear_modules(base) {
            if sel.matches(&m) {
                let (r, s) = self.rank_and_scale(&m)?;
                out.push((m, o, i, r, s));
            }
        }
        if out.is_empty() {
            return Err(Error::invalid(format!(
                "LoRA target_modules {:?} match no linear layer of this base model",
                self.target_modules
            )));
        }
        Ok(out)
    }

    fn trains_bias(&self, module: &str, base: &ParamStore, targeted: bool) -> bool {
        let has = base.contains(&format!("{module}.bias"));
        has && (self.bias == "all" || (self.bias == "lora_only" && targeted))
    }

    fn expected(&self, base: &ParamStore) -> Result<Vec<(String, Vec<usize>)>> {
        let mut e = vec![];
        let targeted = self.modules(base)?;
        for (m, o, i, r, _) in &targeted {
            e.push((format!("{m}.lora_A.weight"), vec![*r, *i]));
            e.push((format!("{m}.lora_B.weight"), vec![*o, *r]));
        }
        if self.bias != "none" {
            for (m, o, _) in linear_modules(base) {
                let is_t = targeted.iter().any(|t| t.0 == m);
                if self.trains_bias(&m, base, is_t) {
                    e.push((format!("{m}.bias"), vec![o]));
                }
            }
        }
        Ok(e)
    }
}

/// `(module, out features, in features, rank, scale)`.
pub type LoraModule = (String, usize, usize, usize, f64);

#[derive(Debug)]
pub struct Lora {
    scales: HashMap<String, f64>,
    biases: std::collections::HashSet<String>,
    dropout: f64,
    training: AtomicBool,
    rng: Mutex<StdRng>,
}

impl Lora {
    pub fn init_params(cfg: &LoraConfig, base: &ParamStore, seed: u64) -> Result<ParamStore> {
        let dev = Device::Cpu;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut params = ParamStore::new();
        let var = |v: Vec<f32>, shape: (usize, usize)| -> Result<Var> {
            Ok(Var::from_tensor(&Tensor::from_vec(v, shape, &dev)?)?)
        };
        for (m, o, i, r, _) in cfg.modules(base)? {
            let kaiming = |rng: &mut StdRng, n: usize, fan_in: usize| {
                uniform(rng, n, 1.0 / (fan_in as f64).sqrt())
            };
            let (a, b) = match &cfg.init_lora_weights {
                LoraInit::Default(true) => (kaiming(&mut rng, r * i, i), vec![0.0; o * r]),
                LoraInit::Default(false) => {
                    (kaiming(&mut rng, r * i, i), kaiming(&mut rng, o * r, r))
                }
                LoraInit::Named(n) if n == "gaussian" => {
                    (normal(&mut rng, r * i, 1.0 / r as f64), vec![0.0; o * r])
                }
                LoraInit::Named(n) => {
                    return Err(Error::invalid(format!(
                        "LoRA: init_lora_weights `{n}` is not supported (true, false, gaussian)"
                    )))
                }
            };
            params.insert_trainable(format!("{m}.lora_A.weight"), var(a, (r, i))?);
            params.insert_trainable(format!("{m}.lora_B.weight"), var(b, (o, r))?);
        }
        for (name, shape) in cfg.expected(base)? {
            if name.ends_with(".bias") {
                let b = base.get(&name)?.reshape(shape)?;
                params.insert_trainable(name, Var::from_tensor(&b)?);
            }
        }
        // Consume one value so differently-shaped configs do not share streams by accident.
        let _: u8 = rng.random();
        Ok(params)
    }

    pub fn build(cfg: &LoraConfig, base: &ParamStore, params: &ParamStore) -> Result<Self> {
        let expected = cfg.expected(base)?;
        check_exact("LoRA", params, &expected)?;
        let mut scales = HashMap::new();
        for (m, _, _, _, s) in cfg.modules(base)? {
            scales.insert(m, s);
        }
        let biases = expected
            .iter()
            .filter_map(|(n, _)| n.strip_suffix(".bias").map(str::to_string))
            .collect();
        Ok(Lora {
            scales,
            biases,
            dropout: cfg.lora_dropout,
            training: AtomicBool::new(false),
            rng: Mutex::new(StdRng::seed_from_u64(0x10_4a)),
        })
    }

    /// Fresh parameters and the delta over them.
    pub fn init(cfg: &LoraConfig, base: &ParamStore, seed: u64) -> Result<(Self, ParamStore)> {
        let params = Self::init_params(cfg, base, seed)?;
        Ok((Self::build(cfg, base, &params)?, params))
    }

    pub fn num_modules(&self) -> usize {
        self.scales.len()
    }

    fn dropout(&self, x: &Tensor) -> Result<Tensor> {
        if self.dropout == 0.0 || !self.training.load(Ordering::Relaxed) {
            return Ok(x.clone());
        }
        let keep = 1.0 - self.dropout;
        let mask: Vec<f32> = {
            let mut rng = self
                .rng
                .lock()
                .map_err(|_| Error::invalid("LoRA dropout RNG poisoned"))?;
            (0..x.elem_count())
                .map(|_| {
                    if rng.random::<f64>() < keep {
                        (1.0 / keep) as f32
                    } else {
                        0.0
                    }
                })
                .collect()
        };
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        Ok((x * mask)?)
    }
}

impl Delta for Lora {
    fn method(&self) -> &'static str {
        "lora"
    }

    fn set_training(&self, on: bool) {
        self.training.store(on, Ordering::Relaxed);
    }

    fn is_stochastic(&self) -> bool {
        self.dropout > 0.0 && self.training.load(Ordering::Relaxed)
    }

    fn weight(
        &self,
        name: &str,
        _base: Option<&Tensor>,
        params: &ParamStore,
    ) -> Result<Option<Tensor>> {
        match name.strip_suffix(".bias") {
            Some(m) if self.biases.contains(m) => Ok(Some(params.get(name)?.clone())),
            _ => Ok(None),
        }
    }

    fn linear(
        &self,
        module: &str,
        x: &Tensor,
        _w: Option<&Tensor>,
        y: Tensor,
        params: &ParamStore,
    ) -> Result<Tensor> {
        let Some(scale) = self.scales.get(module) else {
            return Ok(y);
        };
        let a = params.get(&format!("{module}.lora_A.weight"))?;
        let b = params.get(&format!("{module}.lora_B.weight"))?;
        let x = self.dropout(&x.to_dtype(a.dtype())?)?;
        Ok(crate::ops::add_low_rank(
            &y,
            &linear(&x, a, None)?,
            b,
            *scale,
        )?)
    }

    fn fused_linear(
        &self,
        module: &str,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        params: &ParamStore,
    ) -> Result<Option<Tensor>> {
        let Some(scale) = self.scales.get(module) else {
            return Ok(None);
        };
        if !crate::ops::lora_linear::enabled() {
            return Ok(None);
        }
        let a = params.get(&format!("{module}.lora_A.weight"))?;
        let b = params.get(&format!("{module}.lora_B.weight"))?;
        // Dropout feeds the factors a different input than the base product.
        if self.is_stochastic() || x.dtype() != a.dtype() || w.dtype() != a.dtype() {
            return Ok(None);
        }
        Ok(Some(crate::ops::lora_linear(x, w, bias, a, b, *scale)?))
    }

    fn leaves_linear(&self, module: &str) -> bool {
        !self.scales.contains_key(module) && !self.biases.contains(module)
    }

    fn low_rank(&self, module: &str, params: &ParamStore) -> Result<Option<super::LowRank>> {
        let Some(scale) = self.scales.get(module) else {
            return Ok(None);
        };
        // Dropout feeds the factors another input than the base product; a trained bias is
        // another change.
        if self.is_stochastic() || self.biases.contains(module) {
            return Ok(None);
        }
        let a = params.get(&format!("{module}.lora_A.weight"))?;
        let b = params.get(&format!("{module}.lora_B.weight"))?;
        Ok(Some((a.clone(), b.clone(), *scale)))
    }

    fn mergeable(&self) -> bool {
        true
    }

    fn merge(&self, base: &mut ParamStore, params: &ParamStore) -> Result<()> {
        for (m, scale) in &self.scales {
            let w_name = format!("{m}.weight");
            let w = base.get(&w_name)?;
            let a = params.get(&format!("{m}.lora_A.weight"))?;
            let b = params.get(&format!("{m}.lora_B.weight"))?;
            let delta = (b.matmul(a)? * *scale)?;
            let merged = (w.to_dtype(delta.dtype())? + delta)?.to_dtype(w.dtype())?;
            base.insert_frozen(w_name, merged);
        }
        for m in &self.biases {
            let name = format!("{m}.bias");
            base.insert_frozen(name.clone(), params.get(&name)?.detach());
        }
        Ok(())
    }

    fn unmerge(&self, merged: &mut ParamStore, params: &ParamStore) -> Result<()> {
        if !self.biases.is_empty() {
            return Err(Error::invalid(
                "LoRA with trained biases overwrote the base biases: keep the unmerged store",
            ));
        }
        for (m, scale) in &self.scales {
            let w_name = format!("{m}.weight");
            let w = merged.get(&w_name)?;
            let a = params.get(&format!("{m}.lora_A.weight"))?;
            let b = params.get(&format!("{m}.lora_B.weight"))?;
            let delta = (b.matmul(a)? * *scale)?;
            let base = (w.to_dtype(delta.dtype())? - delta)?.to_dtype(w.dtype())?;
            merged.insert_frozen(w_name, base);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_follow_patterns_and_rslora() {
        let mut c = LoraConfig::new(8, 16.0, &["q_proj"]);
        c.rank_pattern.insert("o_proj".into(), 2);
        c.alpha_pattern.insert("up_proj".into(), 4.0);
        assert_eq!(
            c.rank_and_scale("model.layers.0.self_attn.q_proj").unwrap(),
            (8, 2.0)
        );
        assert_eq!(
            c.rank_and_scale("model.layers.0.self_attn.o_proj").unwrap(),
            (2, 8.0)
        );
        assert_eq!(
            c.rank_and_scale("model.layers.0.mlp.up_proj").unwrap(),
            (8, 0.5)
        );
        c.use_rslora = true;
        assert_eq!(
            c.rank_and_scale("model.layers.0.self_attn.o_proj").unwrap(),
            (2, 16.0 / 2f64.sqrt())
        );
    }

    #[test]
    fn peft_config_json_parses() {
        let j = r#"{"r": 4, "lora_alpha": 16, "target_modules": ".*\\.(q_proj|o_proj)", "use_rslora": true,
                    "rank_pattern": {"o_proj": 2}, "alpha_pattern": {}, "bias": "none",
                    "init_lora_weights": false, "layers_to_transform": [0, 5], "layers_pattern": null,
                    "lora_dropout": 0.05}"#;
        let c: LoraConfig = serde_json::from_str(j).unwrap();
        assert!(matches!(c.target_modules, TargetModules::Regex(_)));
        assert_eq!(c.init_lora_weights, LoraInit::Default(false));
        assert_eq!(
            c.layers_to_transform,
            Some(LayerSelection::Many(vec![0, 5]))
        );
    }
}
