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
