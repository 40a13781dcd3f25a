//! Architectures and checkpoint loading. Architectures never parse files: `load` produces a
//! parameter store plus a config, and the architecture reads weights from the store by name.

pub mod bert;
mod checkpointing;
pub mod config;
pub(crate) mod fused_decode;
mod head_screen;
pub mod llama;
pub mod load;
pub mod tokenizer;

pub use bert::Bert;
pub use config::{BertConfig, LlamaConfig};
pub use llama::{KvCache, Llama};
pub use load::{load, load_quantized, BaseStorage, Checkpoint};
pub use tokenizer::{ChatMessage, TextTokenizer};

/// The architecture of a loaded checkpoint.
#[derive(Clone, Debug)]
pub enum Arch {
    Llama(LlamaConfig),
    Bert(BertConfig),
}

impl Arch {
    pub fn name(&self) -> &str {
        match self {
            Arch::Llama(c) => &c.model_type,
            Arch::Bert(_) => "bert",
        }
    }

    pub fn expected_params(&self) -> Vec<(String, Vec<usize>)> {
        match self {
            Arch::Llama(c) => Llama::expected_params(c),
            Arch::Bert(c) => Bert::expected_params(c),
        }
    }
}

/// `run` on the linears `{pre}.{m}` of a sublayer that runs as one op (`ops::fused_block`):
/// when fusing is on, the deltas change those linears by low-rank terms only (or not at all)
/// and replace none of the sublayer's `norms`; dense, half-precision or quantized weights
/// alike. `Ok(None)` otherwise, or where the op declines.
pub(crate) fn fused_sublayer(
    p: &crate::params::ParamStore,
    deltas: &crate::peft::DeltaSet,
    dp: &crate::params::ParamStore,
    (pre, modules): (&str, &[&str]),
    norms: &[&str],
    run: impl FnOnce(&[crate::ops::LinearSpec]) -> crate::Result<Option<candle_core::Tensor>>,
) -> crate::Result<Option<candle_core::Tensor>> {
    use crate::ops::{FrozenWeight, LinearSpec};
    if !crate::ops::encoder_block::enabled() {
        return Ok(None);
    }
    let names: Vec<String> = modules.iter().map(|m| format!("{pre}.{m}")).collect();
    let Some(changes) = deltas.low_rank_only(&names, dp)? else {
        return Ok(None);
    };
    for norm in norms {
        if deltas.replaces(norm, p, dp)? {
            return Ok(None);
        }
    }
    let mut specs = Vec::with_capacity(names.len());
    for (name, change) in names.iter().zip(&changes) {
        let w_name = format!("{name}.weight");
        let w = match (p.quantized(&w_name), p.get_opt(&w_name)) {
            (Some(q), _) => FrozenWeight::Quantized(q),
            (None, Some(w)) => FrozenWeight::Dense(w),
            (None, None) => return Ok(None),
        };
        specs.push(LinearSpec {
            w,
            b: p.get_opt(&format!("{name}.bias")),
            lora: change.as_ref().map(|(a, b, s)| (a, b, *s)),
        });
    }
    run(&specs)
}

/// The dense weight and bias of linear `module` where the layer may fuse it with the residual add
/// (and the activation before it): no delta touches it and the base does not keep it quantized.
pub(crate) fn untouched_linear<'a>(
    p: &'a crate::params::ParamStore,
    deltas: &crate::peft::DeltaSet,
    module: &str,
) -> Option<(&'a candle_core::Tensor, Option<&'a candle_core::Tensor>)> {
    let weight = format!("{module}.weight");
    if !deltas.leaves_linear(module) || p.quantized(&weight).is_some() {
        return None;
    }
    let w = p.get_opt(&weight)?;
    Some((w, p.get_opt(&format!("{module}.bias"))))
}

pub mod testing;
