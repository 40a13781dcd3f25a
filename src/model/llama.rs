//! A Llama-family decoder (Llama 2/3, SmolLM, Mistral, Qwen2) over an explicit parameter store.
//!
//! Weights use Hugging Face names (`model.layers.{i}.self_attn.q_proj.weight`) and Hugging Face's
//! rotate-half RoPE layout; GGUF checkpoints are un-permuted at load time.

use std::sync::Arc;

use candle_core::{DType, Device, IndexOp, Tensor};

use super::config::LlamaConfig;
use crate::ops::{self, RopeTables};
use crate::params::ParamStore;
use crate::peft::DeltaSet;
use crate::Result;

/// The largest RoPE table built up front; longer contexts are refused with a clear error.
const MAX_ROPE_POSITIONS: usize = 1 << 15;

#[derive(Debug, Clone)]
pub struct Llama {
    pub cfg: LlamaConfig,
    rope: RopeTables,
    /// Re-run each layer in the backward pass instead of keeping its activations.
    checkpoint_layers: bool,
}

/// A layer's attention linears, in the order [`ops::decoder_attention`] takes them.
const ATTENTION: [&str; 4] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
];

/// A layer's MLP linears, in the order [`ops::decoder_mlp`] takes them.
const MLP: [&str; 3] = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"];

/// What every layer of one forward pass shares.
#[derive(Debug, Clone)]
struct LayerCtx {
    cos: Tensor,
    sin: Tensor,
    mask: Option<Tensor>,
    /// Prefix-tuning key/value positions in front of the tokens.
    prefix: usize,
    b: usize,
    t: usize,
    dtype: DType,
}

/// Per-layer key/value buffers for incremental decoding. Buffers are allocated once per capacity
/// doubling, not per token.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            len: 0,
        }
    }

    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Append `k, v: [b, h_kv, t, d]` for `layer` and return views of everything cached so far.
    fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        let need = self.len + t;
        let grow = match &self.layers[layer] {
            Some((kb, _)) => kb.dim(2)? < need,
            None => true,
        };
        if grow {
            let (b, h, _, d) = k.dims4()?;
            let cap = need.next_power_of_two().max(64);
            let kb = Tensor::zeros((b, h, cap, d), k.dtype(), k.device())?;
            let vb = Tensor::zeros((b, h, cap, d), v.dtype(), v.device())?;
            if let Some((ok, ov)) = &self.layers[layer] {
                if self.len > 0 {
                    kb.slice_set(&ok.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                    vb.slice_set(&ov.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                }
            }
            self.layers[layer] = Some((kb, vb));
        }
        let (kb, vb) = self.layers[layer].as_ref().expect("allocated above");
        kb.slice_set(&k.contiguous()?, 2, self.len)?;
        vb.slice_set(&v.contiguous()?, 2, self.len)?;
        Ok((kb.narrow(2, 0, need)?, vb.narrow(2, 0, need)?))
    }

    /// Layer `i`'s keys and values so far, `[b, h_kv, len, d]` each (`None` before the first
    /// append).
    pub(crate) fn layer(&self, i: usize) -> Result<Option<(Tensor, Tensor)>> {
        match self.layers.get(i) {
            Some(Some((k, v))) => Ok(Some((k.narrow(2, 0, self.len)?, v.narrow(2, 0, self.len)?))),
            _ => Ok(None),
        }
    }

    fn advance(&mut self, t: usize) {
        self.len += t;
    }
}

impl Llama {
    pub fn new(cfg: LlamaConfig, device: &Device) -> Result<Self> {
        let positions = cfg.max_position_embeddings.clamp(1, MAX_ROPE_POSITIONS);
        let rope = RopeTables::new(
            cfg.head_dim,
            cfg.rope_theta,
            cfg.rope_scaling.as_ref(),
            positions,
            DType::F32,
            device,
        )?;
        Ok(Self {
            cfg,
            rope,
            checkpoint_layers: false,
        })
    }

    /// Activation checkpointing for training: each layer keeps only its input and is re-run in
    /// the backward pass (about one more forward pass of time for much less memory). Gradients
    /// must then be taken with [`ops::checkpoint::backward`]. Ignored with a KV cache and on the
    /// thread of exact second-order MAML.
    pub fn with_activation_checkpointing(mut self, on: bool) -> Self {
        self.checkpoint_layers = on;
        self
    }

    /// RoPE's `cos` and `sin` (`head_dim / 2` each) at position `pos`.
    pub(crate) fn rope_window(&self, pos: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let (cos, sin) = self.rope.window(pos, 1)?;
        Ok((
            cos.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?,
            sin.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?,
        ))
    }

    pub fn activation_checkpointing(&self) -> bool {
        self.checkpoint_layers
    }

    /// Every weight the model reads, with its shape.
    pub fn expected_params(cfg: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
        let (d, f) = (cfg.hidden_size, cfg.intermediate_size);
        let q = cfg.num_attention_heads * cfg.head_dim;
        let kv = cfg.num_key_value_heads * cfg.head_dim;
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![cfg.vocab_size, d],
        )];
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            out.push((format!("{p}.input_layernorm.weight"), vec![d]));
            out.push((format!("{p}.self_attn.q_proj.weight"), vec![q, d]));
            out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, d]));
            out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, d]));
            if cfg.attention_bias {
                out.push((format!("{p}.self_attn.q_proj.bias"), vec![q]));
                out.push((format!("{p}.self_attn.k_proj.bias"), vec![kv]));
                out.push((format!("{p}.self_attn.v_proj.bias"), vec![kv]));
            }
            out.push((format!("{p}.self_attn.o_proj.weight"), vec![d, q]));
            if cfg.attention_bias && cfg.model_type != "qwen2" {
                out.push((format!("{p}.self_attn.o_proj.bias"), vec![d]));
            }
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![d]));
            out.push((format!("{p}.mlp.gate_proj.weight"), vec![f, d]));
            out.push((format!("{p}.mlp.up_proj.weight"), vec![f, d]));
            out.push((format!("{p}.mlp.down_proj.weight"), vec![d, f]));
            if cfg.mlp_bias {
                out.push((format!("{p}.mlp.gate_proj.bias"), vec![f]));
                out.push((format!("{p}.mlp.up_proj.bias"), vec![f]));
                out.push((format!("{p}.mlp.down_proj.bias"), vec![d]));
            }
        }
        out.push(("model.norm.weight".to_string(), vec![d]));
        if !cfg.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), vec![cfg.vocab_size, d]));
        }
        out
    }

    fn proj(
        &self,
        p: &ParamStore,
        deltas: &DeltaSet,
        dp: &ParamStore,
        module: &str,
        x: &Tensor,
    ) -> Result<Tensor> {
        let weight_name = format!("{module}.weight");
        let bias_name = format!("{module}.bias");
        let b = deltas.weight(&bias_name, p.get_opt(&bias_name), dp)?;
        let x = deltas.linear_input(module, x.clone(), dp)?;
        let (y, w) = match p.quantized(&weight_name) {
            Some(q) => {
                let y = ops::quantized_linear(&x, q)?;
                let y = match &b {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                };
                (y, None)
            }
            None => {
                let w = p.get(&weight_name)?;
                if let Some(y) = deltas.fused_linear(module, &x, w, b.as_ref(), dp)? {
                    return Ok(y);
                }
                (ops::linear(&x, w, b.as_ref())?, Some(w))
            }
        };
        if deltas.is_empty() {
            return Ok(y);
        }
        deltas.linear(module, &x, w, y, dp)
    }

    /// Final hidden states `[b, t, d]` (after the last norm) for `input_ids: [b, t]`.
    ///
    /// `attention_mask: [b, t]` (1 keep, 0 pad) is for full-sequence passes only. Deltas that add
    /// positions are handled here: prefix tuning's keys/values come first in every layer (real
    /// tokens' positions start after them), prompt tuning's soft tokens are prepended to the
    /// embeddings and their outputs dropped. With a cache, both enter on the first call only.
    pub fn forward_hidden(
        &self,
        p: &ParamStore,
        deltas: &DeltaSet,
        dp: &ParamStore,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (b, t) = input_ids.dims2()?;
        let past = cache.as_ref().map_or(0, |c| c.len());
        if attention_mask.is_some() && cache.is_some() {
            return Err(crate::Error::invalid(
                "padding masks are not supported together with a KV cache",
            ));
        }
        if past > 0 && deltas.mixes_positions() {
            return Err(crate::Error::invalid(
                "a delta mixes sequence positions (TAMS convolutions): the KV cache cannot extend \
                 a sequence; run the full sequence again without a cache",
            ));
        }
        let first = past == 0;
        let prefix = if first { deltas.prefix_len() } else { 0 };
        const EMBED: &str = "model.embed_tokens.weight";
        let ids = input_ids.flatten_all()?;
        // Compute in f32 (bf16/f16/quantized storage is for memory only); f64 weights, used by
        // gradient checks, compute in f64.
        let (rows, dtype) = match p.quantized(EMBED) {
            Some(q) => (q.rows(&ids)?, DType::F32),
            None => {
                let embed = p.get(EMBED)?;
                let dtype = if embed.dtype() == DType::F64 {
                    DType::F64
                } else {
                    DType::F32
                };
                (embed.index_select(&ids, 0)?, dtype)
            }
        };
        let mut x = rows.reshape((b, t, cfg.hidden_size))?.to_dtype(dtype)?;
        let virtual_tokens = if first { deltas.virtual_tokens() } else { 0 };
        if virtual_tokens > 0 {
            x = deltas.input_embeddings(x, dp)?;
        }
        let t = x.dim(1)?;
        let offset = past + prefix;
        let (cos, sin) = self.rope.window(offset, t)?;
        let (cos, sin) = (cos.to_dtype(dtype)?, sin.to_dtype(dtype)?);
        let mut mask = if t > 1 {
            Some(ops::causal_mask(t, offset + t, offset, dtype, x.device())?)
        } else {
            None
        };
        if let Some(am) = attention_mask {
            // Prefix keys and soft tokens are always visible.
            let extra = prefix + virtual_tokens;
            let am = if extra > 0 {
                let ones = Tensor::ones((b, extra), am.dtype(), am.device())?;
                Tensor::cat(&[&ones, am], 1)?
            } else {
                am.clone()
            };
            let pm = ops::padding_mask(&am, dtype)?;
            mask = Some(match mask {
                Some(m) => m.broadcast_add(&pm)?,
                None => pm,
            });
        }
        let ctx = LayerCtx {
            cos,
            sin,
            mask,
            prefix,
            b,
            t,
            dtype,
        };
        if cache.is_none() && super::checkpointing::applies(self.checkpoint_layers, &x) {
            let model = self.clone();
            let layer: Arc<super::checkpointing::Layer> = Arc::new(move |i, p, deltas, dp, x| {
                model.layer(i, p, deltas, dp, &ctx, x.clone(), None)
            });
            x = super::checkpointing::layers(cfg.num_hidden_layers, p, deltas, dp, x, layer)?;
        } else {
            for i in 0..cfg.num_hidden_layers {
                x = self.layer(i, p, deltas, dp, &ctx, x, cache.as_deref_mut())?;
            }
        }
        if let Some(c) = cache {
            c.advance(prefix + t);
        }
        let w = deltas.resolve("model.norm.weight", p, dp)?;
        let x = ops::rms_norm(&x, &w, cfg.rms_norm_eps)?;
        if virtual_tokens > 0 {
            return Ok(x.narrow(1, virtual_tokens, t - virtual_tokens)?);
        }
        Ok(x)
    }

    /// Decoder layer `i`: attention and feed-forward blocks with their residuals.
    #[allow(clippy::too_many_arguments)]
    fn layer(
        &self,
        i: usize,
        p: &ParamStore,
        deltas: &DeltaSet,
        dp: &ParamStore,
        ctx: &LayerCtx,
        x: Tensor,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let LayerCtx {
            cos,
            sin,
            mask,
            prefix,
            b,
            t,
            dtype,
        } = ctx;
        let (b, t, prefix, dtype) = (*b, *t, *prefix, *dtype);
        let (h, hkv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let scale = 1.0 / (hd as f64).sqrt();
        let pre = format!("model.layers.{i}");
        let whole_sequence = cache.is_none() && prefix == 0;
        if whole_sequence {
            let fused = self.fused_sublayer(&pre, p, deltas, dp, &ATTENTION, "input", |l, n| {
                let heads = ops::Heads { q: h, kv: hkv };
                ops::decoder_attention(
                    &x,
                    [l[0], l[1], l[2], l[3]],
                    n,
                    heads,
                    (cos, sin),
                    mask.as_ref(),
                )
            })?;
            if let Some(y) = fused {
                return self.mlp_sublayer(i, p, deltas, dp, y, true);
            }
        }
        let residual = x.clone();
        let w = deltas.resolve(&format!("{pre}.input_layernorm.weight"), p, dp)?;
        let xn = ops::rms_norm(&x, &w, cfg.rms_norm_eps)?;
        let q = self.proj(p, deltas, dp, &format!("{pre}.self_attn.q_proj"), &xn)?;
        let k = self.proj(p, deltas, dp, &format!("{pre}.self_attn.k_proj"), &xn)?;
        let v = self.proj(p, deltas, dp, &format!("{pre}.self_attn.v_proj"), &xn)?;
        let q = ops::rope(&q.reshape((b, t, h, hd))?, cos, sin)?;
        let k = ops::rope(&k.reshape((b, t, hkv, hd))?, cos, sin)?;
        if whole_sequence {
            // Training and full-sequence passes: attention on the projections' own layout.
            let a = ops::attention_heads(&q, &k, &v, (h, hkv), mask.as_ref(), scale)?;
            return self.attention_out_and_mlp(i, p, deltas, dp, residual, a, true);
        }
        let q = q.transpose(1, 2)?;
        let mut k = k.transpose(1, 2)?;
        let mut v = v.reshape((b, t, hkv, hd))?.transpose(1, 2)?;
        if prefix > 0 {
            if let Some((pk, pv)) = deltas.attention_prefix(i, b, dp)? {
                k = Tensor::cat(&[&pk.to_dtype(dtype)?, &k.contiguous()?], 2)?;
                v = Tensor::cat(&[&pv.to_dtype(dtype)?, &v.contiguous()?], 2)?;
            }
        }
        let (k, v) = match cache {
            Some(c) => c.append(i, &k, &v)?,
            None => (k, v),
        };
        let a = ops::attention(&q, &k, &v, mask.as_ref(), scale)?;
        let a = a.transpose(1, 2)?.reshape((b, t, h * hd))?;
        self.attention_out_and_mlp(i, p, deltas, dp, residual, a, false)
    }

    /// `run` on sublayer `pre`'s linears `modules` and RMSNorm `{norm}_layernorm` when the deltas
    /// change those linears by low-rank terms only (or not at all), and keep the norm (dense,
    /// half-precision or quantized weights alike); `None` otherwise or where the op declines.
    #[allow(clippy::too_many_arguments)]
    fn fused_sublayer(
        &self,
        pre: &str,
        p: &ParamStore,
        deltas: &DeltaSet,
        dp: &ParamStore,
        modules: &[&str],
        norm: &str,
        run: impl FnOnce(&[ops::LinearSpec], ops::RmsNormSpec) -> candle_core::Result<Option<Tensor>>,
    ) -> Result<Option<Tensor>> {
        let norm_name = format!("{pre}.{norm}_layernorm.weight");
        super::fused_sublayer(p, deltas, dp, (pre, modules), &[&norm_name], |specs| {
            let norm = ops::RmsNormSpec {
                w: p.get(&norm_name)?,
                eps: self.cfg.rms_norm_eps,
            };
            Ok(run(specs, norm)?)
        })
    }

    /// The rest of layer `i` after attention: output projection, residual, and the MLP block;
    /// `whole_sequence` for passes without a cache or prefix.
    #[allow(clippy::too_many_arguments)]
    fn attention_out_and_mlp(
        &self,
        i: usize,
        p: &ParamStore,
        deltas: &DeltaSet,
        dp: &ParamStore,
        residual: Tensor,
        a: Tensor,
        whole_sequence: bool,
    ) -> Result<Tensor> {
        let pre = format!("model.layers.{i}");
        let o_proj = format!("{pre}.self_attn.o_proj");
        let x = match super::untouched_linear(p, deltas, &o_proj) {
            Some((w, b)) => ops::linear_residual(&a, w, b, &residual)?,
            None => {
                let o = self.proj(p, deltas, dp, &o_proj, &a)?;
                let o = if deltas.is_empty() {
                    o
                } else {
                    deltas.after_attention(i, o, dp)?
                };
                (residual + o)?
            }
        };
        self.mlp_sublayer(i, p, deltas, dp, x, whole_sequence)
    }

    /// Layer `i`'s MLP sublayer with its residual: one op where it fuses (passes over the whole
    /// sequence, see [`Self::fused_sublayer`]), else composed.
    fn mlp_sublayer(
        &self,
        i: usize,
        p: &ParamStore,
        deltas: &DeltaSet,
        dp: &ParamStore,
        x: Tensor,
        whole_sequence: bool,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let pre = format!("model.layers.{i}");
        if whole_sequence {
            let fused =
                self.fused_sublayer(&pre, p, deltas, dp, &MLP, "post_attention", |l, n| {
                    ops::decoder_mlp(&x, [l[0], l[1], l[2]], n)
                })?;
            if let Some(y) = fused {
                return Ok(y);
            }
        }
        let residual = x.clone();
        let w = deltas.resolve(&format!("{pre}.post_attention_layernorm.weight"), p, dp)?;
        let xn = ops::rms_norm(&x, &w, cfg.rms_norm_eps)?;
        let g = self.proj(p, deltas, dp, &format!("{pre}.mlp.gate_proj"), &xn)?;
        let u = self.proj(p, deltas, dp, &format!("{pre}.mlp.up_proj"), &xn)?;
        let down_proj = format!("{pre}.mlp.down_proj");
        if let Some((w, b)) = super::untouched_linear(p, deltas, &down_proj) {
            return Ok(ops::swiglu_linear_residual(&g, &u, w, b, &residual)?);
        }
        let m = ops::swiglu(&g, &u)?;
        let dn = self.proj(p, deltas, dp, &down_proj, &m)?;
        let dn = if deltas.is_empty() {
            dn
        } else {
            deltas.after_ffn(i, &xn, dn, dp)?
        };
        Ok((residual + dn)?)
    }

    /// Logits `[..., vocab]` from hidden states.
    pub fn lm_head(&self, p: &ParamStore, hidden: &Tensor) -> Result<Tensor> {
        let name = if self.cfg.tie_word_embeddings {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        match p.quantized(name) {
            Some(q) => Ok(ops::quantized_logits(hidden, q)?),
            None => Ok(ops::linear(hidden, p.get(name)?, None)?),
        }
    }

    /// Mean cross-entropy of the logits of `hidden` against `targets` (skipping `ignore_index`),
    /// with the head and the loss fused: the `[tokens, vocab]` logits are never materialised.
    pub fn lm_head_loss(
        &self,
        p: &ParamStore,
        hidden: &Tensor,
        targets: &Tensor,
        ignore_index: i64,
    ) -> Result<Tensor> {
        let name = if self.cfg.tie_word_embeddings {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        if let Some(q) = p.quantized(name) {
            return Ok(ops::quantized_lm_head_cross_entropy(
                hidden,
                q,
                targets,
                ignore_index,
            )?);
        }
        Ok(ops::lm_head_cross_entropy(
            hidden,
            p.get(name)?,
            targets,
            ignore_index,
        )?)
    }

    /// Logits `[b, t, vocab]` for every position.
    pub fn forward(
        &self,
        p: &ParamStore,
        deltas: &DeltaSet,
        dp: &ParamStore,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let h = self.forward_hidden(p, deltas, dp, input_ids, attention_mask, None)?;
        self.lm_head(p, &h)
    }

    /// Logits `[b, vocab]` of the last position only, extending `cache` (generation).
    pub fn forward_last(
        &self,
        p: &ParamStore,
        deltas: &DeltaSet,
        dp: &ParamStore,
        input_ids: &Tensor,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let h = self.forward_hidden(p, deltas, dp, input_ids, None, Some(cache))?;
        let t = h.dim(1)?;
        self.lm_head(p, &h.i((.., t - 1, ..))?.contiguous()?)
    }
}
