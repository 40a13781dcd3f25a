//! A base model with its mergeable deltas folded in, written as a Hugging Face directory that
//! metapeft and `transformers` both load.

use std::path::Path;

use candle_core::{DType, Tensor};

use super::hf_dir::write_parts;
use crate::model::{Arch, Checkpoint};
use crate::params::ParamStore;
use crate::peft::DeltaSet;
use crate::Result;

/// Merge `deltas` into the checkpoint's weights and write the result to `dir`.
pub fn write_merged(
    ckpt: &Checkpoint,
    deltas: &DeltaSet,
    delta_params: &ParamStore,
    dir: &Path,
) -> Result<()> {
    let mut merged = deltas.merge(&ckpt.params, delta_params)?;
    let mut arch = ckpt.arch.clone();
    if let Arch::Llama(cfg) = &mut arch {
        // Deltas may add biases (BitFit); Llama configs switch biases on for whole groups, so the
        // missing members of a group get zeros.
        let groups: [(&[&str], bool); 2] = [
            (
                &[
                    "self_attn.q_proj",
                    "self_attn.k_proj",
                    "self_attn.v_proj",
                    "self_attn.o_proj",
                ],
                true,
            ),
            (&["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"], false),
        ];
        for (members, is_attention) in groups {
            let any = (0..cfg.num_hidden_layers).any(|i| {
                members
                    .iter()
                    .any(|m| merged.contains(&format!("model.layers.{i}.{m}.bias")))
            });
            let already = if is_attention {
                cfg.attention_bias
            } else {
                cfg.mlp_bias
            };
            if !any || already && !(is_attention && cfg.model_type == "qwen2") {
                continue;
            }
            for i in 0..cfg.num_hidden_layers {
                for m in members {
                    let name = format!("model.layers.{i}.{m}.bias");
                    if !merged.contains(&name) {
                        let out = merged
                            .get(&format!("model.layers.{i}.{m}.weight"))?
                            .dim(0)?;
                        merged.insert_frozen(
                            name,
                            Tensor::zeros(out, DType::F32, &candle_core::Device::Cpu)?,
                        );
                    }
                }
            }
            if is_attention {
                cfg.attention_bias = true;
                if cfg.model_type == "qwen2" {
                    // Qwen2 has no o_proj bias; a llama config carries all four.
                    cfg.model_type = "llama".into();
                }
            } else {
                cfg.mlp_bias = true;
            }
        }
    }
    write_parts(&arch, &merged, &ckpt.tokenizer, dir)
}
