//! A BERT-family encoder (all-MiniLM-L6-v2 and friends) with sentence embeddings by mean pooling
//! over the attention mask followed by L2 normalisation (sentence-transformers' recipe).

use candle_core::{DType, Tensor, D};

use super::config::BertConfig;
use crate::ops;
use crate::params::ParamStore;
use crate::peft::DeltaSet;
use crate::Result;

#[derive(Debug, Clone)]
pub struct Bert {
    pub cfg: BertConfig,
    /// Re-run each layer in the backward pass instead of keeping its activations.
    checkpoint_layers: bool,
}

impl Bert {
    pub fn new(cfg: BertConfig) -> Self {
        Self {
            cfg,
            checkpoint_layers: false,
        }
    }

    /// Activation checkpointing for training, as [`super::Llama::with_activation_checkpointing`].
    pub fn with_activation_checkpointing(mut self, on: bool) -> Self {
        self.checkpoint_layers = on;
        self
    }

    pub fn expected_params(cfg: &BertConfig) -> Vec<(String, Vec<usize>)> {
        let (d, f) = (cfg.hidden_size, cfg.intermediate_size);
        let mut out = vec![
            (
                "embeddings.word_embeddings.weight".into(),
                vec![cfg.vocab_size, d],
            ),
            (
                "embeddings.position_embeddings.weight".into(),
                vec![cfg.max_position_embeddings, d],
            ),
            (
                "embeddings.token_type_embeddings.weight".into(),
                vec![cfg.type_vocab_size, d],
            ),
            ("embeddings.LayerNorm.weight".into(), vec![d]),
            ("embeddings.LayerNorm.bias".into(), vec![d]),
        ];
        for i in 0..cfg.num_hidden_layers {
            let p = format!("encoder.layer.{i}");
            for (m, o, inp) in [
                ("attention.self.query", d, d),
                ("attention.self.key", d, d),
                ("attention.self.value", d, d),
                ("attention.output.dense", d, d),
                ("intermediate.dense", f, d),
                ("output.dense", d, f),
            ] {
                out.push((format!("{p}.{m}.weight"), vec![o, inp]));
                out.push((format!("{p}.{m}.bias"), vec![o]));
            }
            for m in ["attention.output.LayerNorm", "output.LayerNorm"] {
                out.push((format!("{p}.{m}.weight"), vec![d]));
                out.push((format!("{p}.{m}.bias"), vec![d]));
            }
        }
        out
    }

    fn dense(
        &self,
        p: &ParamStore,
        deltas: &DeltaSet,
        dp: &ParamStore,
        module: &str,
        x: &Tensor,
    ) -> Result<Tensor> {
        let w = p.get(&format!("{module}.weight"))?;
        let b = deltas.resolve(&format!("{module}.bias"), p, dp)?;
        if deltas.is_empty() {
            return Ok(ops::linear(x, w, Some(&b))?);
        }
        let x = deltas.linear_input(module, x.clone(), dp)?;
        if let Some(y) = deltas.fused_linear(module, &x, w, Some(&b), dp)? {
            return Ok(y);
        }
        let y = ops::linear(&x, w, Some(&b))?;
        deltas.linear(module, &x, Some(w), y, dp)
    }

    fn norm(
        &self,
        p: &ParamStore,
        deltas: &DeltaSet,
        dp: &ParamStore,
        module: &str,
        x: &Tensor,
    ) -> Result<Tensor> {
        Ok(ops::layer_norm(
            x,
            &deltas.resolve(&format!("{module}.weight"), p, dp)?,
            &deltas.resolve(&format!("{module}.bias"), p, dp)?,
            self.cfg.layer_norm_eps,
        )?)
    }

    /// Token states `[b, t, d]` for `input_ids: [b, t]` with `attention_mask: [b, t]`.
    pub fn forward(
        &self,
        p: &ParamStore,
        deltas: &DeltaSet,
        dp: &ParamStore,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: &Tensor,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (b, t) = input_ids.dims2()?;
        if t > cfg.max_position_embeddings {
            return Err(crate::Error::invalid(format!(
                "input of {t} tokens exceeds the encoder's {} positions",
                cfg.max_position_embeddings
            )));
        }
        let dev = input_ids.device();
        let d = cfg.hidden_size;
        let word_emb = p.get("embeddings.word_embeddings.weight")?;
        let dtype = if word_emb.dtype() == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let gather = |name: &str, ids: &Tensor| -> Result<Tensor> {
            Ok(p.get(name)?
                .index_select(&ids.flatten_all()?, 0)?
                .to_dtype(dtype)?)
        };
        let words = gather("embeddings.word_embeddings.weight", input_ids)?.reshape((b, t, d))?;
        let pos_ids = Tensor::arange(0u32, t as u32, dev)?;
        let pos = gather("embeddings.position_embeddings.weight", &pos_ids)?.reshape((1, t, d))?;
        let types = match token_type_ids {
            Some(tt) => {
                gather("embeddings.token_type_embeddings.weight", tt)?.reshape((b, t, d))?
            }
            None => gather(
                "embeddings.token_type_embeddings.weight",
                &Tensor::zeros(1, DType::U32, dev)?,
            )?
            .reshape((1, 1, d))?,
        };
        let x = words.broadcast_add(&pos)?.broadcast_add(&types)?;
        if deltas.prefix_len() > 0 || deltas.virtual_tokens() > 0 {
            return Err(crate::Error::invalid(
                "prefix and prompt tuning are implemented for decoders only so far",
            ));
        }
        let mut x = self.norm(p, deltas, dp, "embeddings.LayerNorm", &x)?;
        let mask = ops::padding_mask(attention_mask, dtype)?;
        if !super::checkpointing::applies(self.checkpoint_layers, &x) {
            for i in 0..cfg.num_hidden_layers {
                x = self.layer(i, p, deltas, dp, &mask, x)?;
            }
            return Ok(x);
        }
        let model = self.clone();
        let layer: std::sync::Arc<super::checkpointing::Layer> =
            std::sync::Arc::new(move |i, p, deltas, dp, x| {
                model.layer(i, p, deltas, dp, &mask, x.clone())
            });
        let x = super::checkpointing::layers(cfg.num_hidden_layers, p, deltas, dp, x, layer)?;
        Ok(x)
    }

    /// Encoder layer `i`: self-attention and feed-forward blocks, each with residual + LayerNorm.
    /// A block runs as one op where the deltas only add low-rank changes to its linears
    /// ([`ops::encoder_attention`], [`ops::encoder_ffn`]), else composed.
    fn layer(
        &self,
        i: usize,
        p: &ParamStore,
        deltas: &DeltaSet,
        dp: &ParamStore,
        mask: &Tensor,
        x: Tensor,
    ) -> Result<Tensor> {
        let pre = format!("encoder.layer.{i}");
        let heads = self.cfg.num_attention_heads;
        const ATTENTION: [&str; 4] = [
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
        ];
        let fused = self.fused_block(
            &pre,
            p,
            deltas,
            dp,
            &ATTENTION,
            "attention.output",
            |l, n| ops::encoder_attention(&x, [l[0], l[1], l[2], l[3]], heads, Some(mask), n),
        )?;
        let x = match fused {
            Some(y) => y,
            None => self.attention_block(i, p, deltas, dp, mask, &x)?,
        };
        let ffn = ["intermediate.dense", "output.dense"];
        let fused = self.fused_block(&pre, p, deltas, dp, &ffn, "output", |l, n| {
            ops::encoder_ffn(&x, [l[0], l[1]], n)
        })?;
        match fused {
            Some(y) => Ok(y),
            None => self.ffn_block(i, p, deltas, dp, &x),
        }
    }

    /// `run` on block `pre`'s linears `modules` and LayerNorm `{norm}.LayerNorm` when the deltas
    /// change those linears by low-rank terms only (or not at all), and keep the norm (dense,
    /// half-precision or quantized weights alike); `None` otherwise or where the op declines.
    #[allow(clippy::too_many_arguments)]
    fn fused_block(
        &self,
        pre: &str,
        p: &ParamStore,
        deltas: &DeltaSet,
        dp: &ParamStore,
        modules: &[&str],
        norm: &str,
        run: impl FnOnce(&[ops::LinearSpec], ops::LayerNormSpec) -> candle_core::Result<Option<Tensor>>,
    ) -> Result<Option<Tensor>> {
        let (nw, nb) = (
            format!("{pre}.{norm}.LayerNorm.weight"),
            format!("{pre}.{norm}.LayerNorm.bias"),
        );
        super::fused_sublayer(p, deltas, dp, (pre, modules), &[&nw, &nb], |specs| {
            let norm = ops::LayerNormSpec {
                w: p.get(&nw)?,
                b: p.get(&nb)?,
                eps: self.cfg.layer_norm_eps,
            };
            Ok(run(specs, norm)?)
        })
    }

    /// The self-attention block composed: `LN(x + attention(x) Wo^T + bo)`.
    fn attention_block(
        &self,
        i: usize,
        p: &ParamStore,
        deltas: &DeltaSet,
        dp: &ParamStore,
        mask: &Tensor,
        x: &Tensor,
    ) -> Result<Tensor> {
        let d = x.dim(2)?;
        let h = self.cfg.num_attention_heads;
        let hd = d / h;
        let scale = 1.0 / (hd as f64).sqrt();
        let pre = format!("encoder.layer.{i}");
        let proj = |m: &str| self.dense(p, deltas, dp, &format!("{pre}.attention.self.{m}"), x);
        let (q, k, v) = (proj("query")?, proj("key")?, proj("value")?);
        let a = ops::attention_heads(&q, &k, &v, (h, h), Some(mask), scale)?;
        let out = format!("{pre}.attention.output.dense");
        let h = match super::untouched_linear(p, deltas, &out) {
            Some((w, b)) => ops::linear_residual(&a, w, b, x)?,
            None => {
                let a = self.dense(p, deltas, dp, &out, &a)?;
                (deltas.after_attention(i, a, dp)? + x)?
            }
        };
        self.norm(
            p,
            deltas,
            dp,
            &format!("{pre}.attention.output.LayerNorm"),
            &h,
        )
    }

    /// The feed-forward block composed: `LN(x + gelu(x Wi^T + bi) Wo^T + bo)`.
    fn ffn_block(
        &self,
        i: usize,
        p: &ParamStore,
        deltas: &DeltaSet,
        dp: &ParamStore,
        x: &Tensor,
    ) -> Result<Tensor> {
        let pre = format!("encoder.layer.{i}");
        let up = self.dense(p, deltas, dp, &format!("{pre}.intermediate.dense"), x)?;
        let out = format!("{pre}.output.dense");
        let h = match super::untouched_linear(p, deltas, &out) {
            Some((w, b)) => ops::gelu_linear_residual(&up, w, b, x)?,
            None => {
                let o = self.dense(p, deltas, dp, &out, &ops::gelu(&up)?)?;
                (deltas.after_ffn(i, x, o, dp)? + x)?
            }
        };
        self.norm(p, deltas, dp, &format!("{pre}.output.LayerNorm"), &h)
    }

    /// Sentence embeddings `[b, d]`: mean over unmasked tokens, then L2 normalised.
    pub fn embed(
        &self,
        p: &ParamStore,
        deltas: &DeltaSet,
        dp: &ParamStore,
        input_ids: &Tensor,
        attention_mask: &Tensor,
    ) -> Result<Tensor> {
        let states = self.forward(p, deltas, dp, input_ids, None, attention_mask)?;
        mean_pool_normalize(&states, attention_mask)
    }
}

/// Mean pooling over `mask: [b, t]` of `states: [b, t, d]`, then L2 normalisation.
pub fn mean_pool_normalize(states: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let m = mask.to_dtype(states.dtype())?.unsqueeze(2)?;
    let sum = states.broadcast_mul(&m)?.sum(1)?;
    let count = m.sum(1)?.clamp(1e-9, f64::INFINITY)?;
    let mean = sum.broadcast_div(&count)?;
    let norm = mean
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::INFINITY)?;
    Ok(mean.broadcast_div(&norm)?)
}

/// Cosine similarity of two embedding vectors.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb).max(1e-12)
}

impl Bert {
    /// Embed texts with the base weights: tokenize (with `[CLS]`/`[SEP]` and the tokenizer's
    /// truncation), pad to the longest, mean-pool and normalise.
    pub fn embed_texts(
        &self,
        p: &ParamStore,
        tok: &crate::model::TextTokenizer,
        texts: &[String],
    ) -> Result<Vec<Vec<f32>>> {
        if texts.is_empty() {
            return Ok(vec![]);
        }
        let dev = candle_core::Device::Cpu;
        let encoded: Vec<Vec<u32>> = texts
            .iter()
            .map(|t| tok.encode(t, true))
            .collect::<Result<_>>()?;
        let max_len = encoded.iter().map(Vec::len).max().unwrap_or(1).max(1);
        let pad = self.cfg.pad_token_id;
        let mut ids = Vec::with_capacity(texts.len() * max_len);
        let mut mask = Vec::with_capacity(texts.len() * max_len);
        for e in &encoded {
            ids.extend(
                e.iter()
                    .copied()
                    .chain(std::iter::repeat(pad))
                    .take(max_len),
            );
            mask.extend((0..max_len).map(|i| (i < e.len()) as u32));
        }
        let ids = Tensor::from_vec(ids, (texts.len(), max_len), &dev)?;
        let mask = Tensor::from_vec(mask, (texts.len(), max_len), &dev)?;
        let e = self.embed(p, &DeltaSet::none(), &ParamStore::new(), &ids, &mask)?;
        Ok(e.to_vec2::<f32>()?)
    }
}
