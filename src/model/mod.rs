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
pub mod testing;
