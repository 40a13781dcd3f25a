//! Tiny random-weight models for fast gradient, meta-gradient and file-format tests.

use candle_core::{DType, Device, Tensor};

use super::config::{BertConfig, LlamaConfig};
use super::{Bert, Llama};
use crate::ops::gradcheck::randn_f64;
use crate::params::ParamStore;
use crate::Result;

/// A 2-layer Llama with GQA (4 heads, 2 KV heads), d = 16, vocab 32.
pub fn tiny_llama_config() -> LlamaConfig {
    LlamaConfig {
        model_type: "llama".into(),
        vocab_size: 32,
        hidden_size: 16,
        intermediate_size: 24,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 4,
        rms_norm_eps: 1e-6,
        rope_theta: 10000.0,
        rope_scaling: None,
        max_position_embeddings: 64,
        tie_word_embeddings: false,
        attention_bias: false,
        mlp_bias: false,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
    }
}

pub fn tiny_bert_config() -> BertConfig {
    BertConfig {
        vocab_size: 32,
        hidden_size: 16,
        intermediate_size: 24,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        max_position_embeddings: 32,
        type_vocab_size: 2,
        layer_norm_eps: 1e-12,
        hidden_act: "gelu".into(),
        pad_token_id: 0,
    }
}

/// Random weights for every parameter of `expected` (norm weights near 1), frozen, in `dtype`.
pub fn random_params(
    expected: &[(String, Vec<usize>)],
    seed: u64,
    dtype: DType,
) -> Result<ParamStore> {
    let mut p = ParamStore::new();
    for (i, (name, shape)) in expected.iter().enumerate() {
        let is_norm = name.contains("norm") || name.contains("LayerNorm.weight");
        let t = if is_norm && name.ends_with("weight") {
            (randn_f64(shape, seed + i as u64, 0.1)? + 1.0)?
        } else {
            randn_f64(shape, seed + i as u64, 0.5)?
        };
        p.insert_frozen(name.clone(), t.to_dtype(dtype)?);
    }
    Ok(p)
}

pub fn tiny_llama(seed: u64, dtype: DType) -> Result<(Llama, ParamStore)> {
    let cfg = tiny_llama_config();
    let p = random_params(&Llama::expected_params(&cfg), seed, dtype)?;
    Ok((Llama::new(cfg, &Device::Cpu)?, p))
}

pub fn tiny_bert(seed: u64, dtype: DType) -> Result<(Bert, ParamStore)> {
    let cfg = tiny_bert_config();
    let p = random_params(&Bert::expected_params(&cfg), seed, dtype)?;
    Ok((Bert::new(cfg), p))
}

/// Token ids `[b, t]` in `1..vocab`.
pub fn token_ids(b: usize, t: usize, vocab: usize, seed: u64) -> Result<Tensor> {
    let v: Vec<u32> = (0..b * t)
        .map(|i| (1 + (i as u64 * 7 + seed * 13) % (vocab as u64 - 1)) as u32)
        .collect();
    Ok(Tensor::from_vec(v, (b, t), &Device::Cpu)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck;
    use crate::peft::lora::{Lora, LoraConfig};
    use crate::peft::DeltaSet;

    /// The whole decoder (embeddings, norms, RoPE, GQA attention, SwiGLU, LM head, cross-entropy)
    /// differentiated with respect to LoRA factors on every linear, against finite differences.
    #[test]
    fn llama_lora_gradient_matches_finite_differences() -> Result<()> {
        let all = [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ];
        llama_lora_gradient_check(&all, |n| {
            n.contains("layers.0.self_attn.q_proj")
                || n.contains("layers.1.mlp.down_proj")
                || n.contains("layers.1.self_attn.k_proj.lora_A")
        })
    }

    /// With LoRA on q and v only, the output projections and the feed-forward tails (SwiGLU,
    /// down projection, residual add) run as the fused residual ops: the gradient reaching the
    /// first layer's factors goes back through all of them.
    #[test]
    fn llama_lora_qv_gradient_through_fused_tails_matches_finite_differences() -> Result<()> {
        llama_lora_gradient_check(&["q_proj", "v_proj"], |n| n.contains("layers.0."))
    }

    fn llama_lora_gradient_check(targets: &[&str], pick: impl Fn(&str) -> bool) -> Result<()> {
        let (model, base) = tiny_llama(3, DType::F64)?;
        let cfg = LoraConfig {
            init_lora_weights: crate::peft::lora::LoraInit::Default(false),
            ..LoraConfig::new(2, 4.0, targets)
        };
        let (lora, lp) = Lora::init(&cfg, &base, 5)?;
        let lp = lp.to_dtype(DType::F64)?;
        let mut deltas = DeltaSet::none();
        deltas.push(lora);
        let ids = token_ids(2, 5, 32, 1)?;
        let names: Vec<String> = lp.vars().into_iter().map(|(n, _)| n).collect();
        // Check a few factors (every element of each) to keep the test fast.
        let picked: Vec<&String> = names.iter().filter(|n| pick(n)).collect();
        assert!(!picked.is_empty());
        let inputs: Vec<Tensor> = picked
            .iter()
            .map(|n| {
                lp.get(n)
                    .map(|t| t.to_dtype(DType::F64))
                    .and_then(|r| r.map_err(Into::into))
            })
            .collect::<Result<_>>()?;
        let f = |xs: &[Tensor]| -> candle_core::Result<Tensor> {
            // The checked factors come from the closure's arguments so autodiff sees them.
            let mut s2 = ParamStore::new();
            for (name, p) in lp.iter() {
                match picked.iter().position(|n| n.as_str() == name) {
                    Some(i) => s2.insert_frozen(name.to_string(), xs[i].clone()),
                    None => s2.insert_frozen(name.to_string(), p.tensor().clone()),
                }
            }
            let logits = model
                .forward(&base, &deltas, &s2, &ids, None)
                .map_err(candle_core::Error::wrap)?;
            let targets = ids.narrow(1, 1, 4)?;
            crate::ops::cross_entropy(&logits.narrow(1, 0, 4)?, &targets, -100)
        };
        let err = gradcheck::check(f, &inputs, 1e-6)?;
        assert!(err < 1e-6, "rel error {err}");
        Ok(())
    }

    #[test]
    fn bert_gradient_matches_finite_differences() -> Result<()> {
        let (model, base) = tiny_bert(4, DType::F64)?;
        let ids = token_ids(2, 4, 32, 2)?;
        let mask = Tensor::new(&[[1u32, 1, 1, 1], [1, 1, 1, 0]], &Device::Cpu)?;
        let name = "encoder.layer.1.attention.self.query.weight";
        let w = base.get(name)?.clone();
        let f = |xs: &[Tensor]| -> candle_core::Result<Tensor> {
            let mut p = base.clone();
            p.insert_frozen(name, xs[0].clone());
            model
                .embed(&p, &DeltaSet::none(), &ParamStore::new(), &ids, &mask)
                .map_err(candle_core::Error::wrap)
        };
        let err = gradcheck::check(f, &[w], 1e-6)?;
        assert!(err < 1e-6, "rel error {err}");
        Ok(())
    }

    /// With LoRA on query and value only, both output projections of every layer take the
    /// residual inside their product (12 rows: above the matrix-vector cut-off); the gradient
    /// reaching the first layer's factors goes back through all of them.
    #[test]
    fn bert_lora_gradient_through_fused_residuals_matches_finite_differences() -> Result<()> {
        let (model, base) = tiny_bert(5, DType::F64)?;
        let cfg = LoraConfig {
            init_lora_weights: crate::peft::lora::LoraInit::Default(false),
            ..LoraConfig::new(2, 4.0, &["query", "value"])
        };
        let (lora, lp) = Lora::init(&cfg, &base, 6)?;
        let lp = lp.to_dtype(DType::F64)?;
        let mut deltas = DeltaSet::none();
        deltas.push(lora);
        let ids = token_ids(3, 4, 32, 7)?;
        let mask = Tensor::new(&[[1u32, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]], &Device::Cpu)?;
        let picked: Vec<String> = lp
            .names()
            .filter(|n| n.contains("layer.0."))
            .map(String::from)
            .collect();
        assert_eq!(picked.len(), 4);
        let inputs: Vec<Tensor> = picked
            .iter()
            .map(|n| lp.get(n).cloned())
            .collect::<Result<_>>()?;
        let f = |xs: &[Tensor]| -> candle_core::Result<Tensor> {
            let mut s2 = ParamStore::new();
            for (name, p) in lp.iter() {
                match picked.iter().position(|n| n == name) {
                    Some(i) => s2.insert_frozen(name.to_string(), xs[i].clone()),
                    None => s2.insert_frozen(name.to_string(), p.tensor().clone()),
                }
            }
            model
                .embed(&base, &deltas, &s2, &ids, &mask)
                .map_err(candle_core::Error::wrap)
        };
        let err = gradcheck::check(f, &inputs, 1e-6)?;
        assert!(err < 1e-6, "rel error {err}");
        Ok(())
    }

    #[test]
    fn kv_cache_matches_full_forward() -> Result<()> {
        let (model, p) = tiny_llama(7, DType::F32)?;
        let ids = token_ids(1, 6, 32, 3)?;
        let none = DeltaSet::none();
        let e = ParamStore::new();
        let full = model.forward(&p, &none, &e, &ids, None)?;
        let mut cache = super::super::KvCache::new(2);
        let a = model.forward_last(&p, &none, &e, &ids.narrow(1, 0, 4)?, &mut cache)?;
        let b = model.forward_last(&p, &none, &e, &ids.narrow(1, 4, 1)?, &mut cache)?;
        let c = model.forward_last(&p, &none, &e, &ids.narrow(1, 5, 1)?, &mut cache)?;
        for (got, pos) in [(a, 3), (b, 4), (c, 5)] {
            let want = full.narrow(1, pos, 1)?.squeeze(1)?;
            let d = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d < 1e-5, "position {pos}: {d}");
        }
        Ok(())
    }

    /// `lp` in f64 with every entry a fresh trainable `Var`.
    fn trainable_f64(lp: &ParamStore) -> Result<ParamStore> {
        let mut s = ParamStore::new();
        for (n, p) in lp.iter() {
            let t = p.tensor().to_dtype(DType::F64)?;
            s.insert_trainable(n, candle_core::Var::from_tensor(&t)?);
        }
        Ok(s)
    }

    /// The gradients of `loss` for every trainable entry of `stores`, by name (all must exist).
    fn named_grads(loss: &Tensor, stores: &[&ParamStore]) -> Result<Vec<(String, Tensor)>> {
        let g = crate::ops::backward(loss)?;
        let mut out = Vec::new();
        for (n, v) in stores.iter().flat_map(|s| s.vars()) {
            let gv = g.get(v.as_tensor()).cloned();
            out.push((n.clone(), gv.ok_or_else(|| crate::Error::invalid(n))?));
        }
        Ok(out)
    }

    /// Equal to 1e-12 of each gradient's scale, and none identically zero.
    fn assert_same_grads(plain: &[(String, Tensor)], ckpt: &[(String, Tensor)]) -> Result<()> {
        assert_eq!(plain.len(), ckpt.len());
        for ((n, a), (_, c)) in plain.iter().zip(ckpt) {
            let d = (a - c)?.abs()?.max_all()?.to_scalar::<f64>()?;
            let s = a.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(
                s > 0.0 && d <= 1e-12 * s.max(1.0),
                "{n}: differs by {d} (scale {s})"
            );
        }
        Ok(())
    }

    /// Activation checkpointing changes memory, not results: the LoRA factors' (every linear),
    /// trainable base norms' and embedding's gradients equal the plain graph's.
    #[test]
    fn checkpointed_layers_give_the_plain_gradients() -> Result<()> {
        let (model, mut base) = tiny_llama(7, DType::F64)?;
        base.make_trainable(|n| n.contains("norm") || n.contains("embed_tokens"))?;
        let cfg = LoraConfig {
            init_lora_weights: crate::peft::lora::LoraInit::Default(false),
            ..LoraConfig::new(
                2,
                4.0,
                &["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
            )
        };
        let (lora, lp) = Lora::init(&cfg, &base, 5)?;
        let lp = trainable_f64(&lp)?;
        let mut deltas = DeltaSet::none();
        deltas.push(lora);
        let ids = token_ids(2, 6, 32, 3)?;
        let targets = token_ids(2, 6, 32, 4)?;
        let run = |m: &Llama| -> Result<Vec<(String, Tensor)>> {
            let h = m.forward_hidden(&base, &deltas, &lp, &ids, None, None)?;
            named_grads(&m.lm_head_loss(&base, &h, &targets, -100)?, &[&lp, &base])
        };
        let plain = run(&model)?;
        let ckpt = run(&model.clone().with_activation_checkpointing(true))?;
        assert!(plain.len() > 20);
        assert_same_grads(&plain, &ckpt)?;
        // LoRA dropout cannot be replayed: a clear error, not wrong gradients.
        let cfg = LoraConfig {
            lora_dropout: 0.1,
            ..cfg
        };
        let (lora, lp) = Lora::init(&cfg, &base, 5)?;
        let mut deltas = DeltaSet::none();
        deltas.push(lora);
        deltas.set_training(true);
        let m = model.with_activation_checkpointing(true);
        let err = m
            .forward_hidden(&base, &deltas, &lp.to_dtype(DType::F64)?, &ids, None, None)
            .unwrap_err();
        assert!(err.to_string().contains("dropout"), "{err}");
        Ok(())
    }

    /// The encoder too: LoRA on query/value, trainable LayerNorms, with a padding mask.
    #[test]
    fn checkpointed_encoder_layers_give_the_plain_gradients() -> Result<()> {
        let (model, mut base) = tiny_bert(9, DType::F64)?;
        base.make_trainable(|n| n.contains("LayerNorm"))?;
        let cfg = LoraConfig {
            init_lora_weights: crate::peft::lora::LoraInit::Default(false),
            ..LoraConfig::new(2, 4.0, &["query", "value", "output.dense"])
        };
        let (lora, lp) = Lora::init(&cfg, &base, 5)?;
        let lp = trainable_f64(&lp)?;
        let mut deltas = DeltaSet::none();
        deltas.push(lora);
        let ids = token_ids(2, 5, 32, 3)?;
        let mask = Tensor::new(&[[1u32, 1, 1, 1, 1], [1, 1, 1, 0, 0]], &Device::Cpu)?;
        let run = |m: &Bert| -> Result<Vec<(String, Tensor)>> {
            let h = m.forward(&base, &deltas, &lp, &ids, None, &mask)?;
            named_grads(&(h.sqr()?.sum_all()? * 0.01)?, &[&lp, &base])
        };
        let plain = run(&model)?;
        let ckpt = run(&model.clone().with_activation_checkpointing(true))?;
        assert!(plain.len() > 10);
        assert_same_grads(&plain, &ckpt)?;
        Ok(())
    }
}
