//! Text generation with a KV cache: greedy or sampled (temperature, top-k, top-p, seed), stopping
//! at EOS, a stop string or a token budget, optionally reporting top-N log-probabilities.
//!
//! Deltas that mix sequence positions outside attention (TAMS convolutions) change earlier
//! positions' hidden states in ways a KV cache does not hold: with those, every step recomputes
//! the whole sequence (quadratic, but exact).

use candle_core::{DType, Device, IndexOp, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::Serialize;

use crate::model::fused_decode::{self, FusedDecoder};
use crate::model::{KvCache, Llama, TextTokenizer};
use crate::params::ParamStore;
use crate::peft::DeltaSet;
use crate::{Error, Result};

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// 0 means greedy.
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub seed: u64,
    pub stop: Vec<String>,
    /// How many top log-probabilities to report per generated token (0: none).
    pub logprobs: usize,
    /// Stop when an end-of-sequence token is produced.
    pub stop_at_eos: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
            stop: vec![],
            logprobs: 0,
            stop_at_eos: true,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Step {
    /// The top-N token ids at this step, most likely first.
    pub ids: Vec<u32>,
    /// Their log-probabilities under the model (before temperature and filtering).
    pub logprobs: Vec<f32>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Generation {
    pub prompt_ids: Vec<u32>,
    pub generated_ids: Vec<u32>,
    pub text: String,
    pub steps: Vec<Step>,
    /// `eos`, `stop`, or `length`.
    pub finish_reason: String,
}

/// Generate a continuation of `prompt_ids`. `on_text` receives each new piece of decoded text.
#[allow(clippy::too_many_arguments)]
pub fn generate(
    model: &Llama,
    params: &ParamStore,
    deltas: &DeltaSet,
    delta_params: &ParamStore,
    tokenizer: &TextTokenizer,
    prompt_ids: &[u32],
    opts: &GenerateOptions,
    mut on_text: impl FnMut(&str),
) -> Result<Generation> {
    if prompt_ids.is_empty() {
        return Err(Error::invalid(
            "the prompt is empty: give at least one token",
        ));
    }
    if opts.temperature < 0.0 {
        return Err(Error::invalid("temperature must be >= 0"));
    }
    if let Some(p) = opts.top_p {
        if !(0.0..=1.0).contains(&p) || p == 0.0 {
            return Err(Error::invalid("top-p must be in (0, 1]"));
        }
    }
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let mut decoder = Decoder::new(model, params, deltas, delta_params);
    let mut generated: Vec<u32> = Vec::new();
    let mut steps = Vec::new();
    let mut text = String::new();
    let mut finish = "length";
    let mut input = prompt_ids.to_vec();
    // Greedy decoding without log-probabilities needs only each step's argmax.
    let argmax_only = opts.temperature == 0.0 && opts.logprobs == 0;
    for _ in 0..opts.max_new_tokens {
        let next = match argmax_only {
            true => decoder.next_greedy(&input)?,
            false => {
                let logits = decoder.next_logits(&input)?;
                if opts.logprobs > 0 {
                    steps.push(top_logprobs(&logits, opts.logprobs));
                }
                choose(&logits, opts, &mut rng)
            }
        };
        generated.push(next);
        if opts.stop_at_eos && tokenizer.eos_ids.contains(&next) {
            finish = "eos";
            break;
        }
        let full = tokenizer.decode(&generated, true)?;
        if let Some(pos) = opts.stop.iter().filter_map(|s| full.find(s.as_str())).min() {
            let kept = &full[..pos];
            if kept.len() > text.len() {
                on_text(&kept[text.len()..]);
            }
            text = kept.to_string();
            finish = "stop";
            break;
        }
        // Hold back text that may still be the start of a stop string or an incomplete character.
        if full.len() > text.len()
            && full.is_char_boundary(text.len())
            && !full.ends_with('\u{FFFD}')
        {
            on_text(&full[text.len()..]);
            text = full;
        }
        input = vec![next];
    }
    if finish != "stop" {
        let full = tokenizer.decode(&generated, true)?;
        if full.len() > text.len() && full.is_char_boundary(text.len()) {
            on_text(&full[text.len()..]);
        }
        text = full;
    }
    Ok(Generation {
        prompt_ids: prompt_ids.to_vec(),
        generated_ids: generated,
        text,
        steps,
        finish_reason: finish.to_string(),
    })
}

/// Next-token logits for a growing sequence: from a KV cache, or by recomputing the whole
/// sequence when a delta mixes positions ([`DeltaSet::mixes_positions`]). The base model decodes
/// single tokens after the prompt with [`FusedDecoder`] when its weights allow.
pub(crate) struct Decoder<'a> {
    model: &'a Llama,
    params: &'a ParamStore,
    deltas: &'a DeltaSet,
    delta_params: &'a ParamStore,
    cache: Option<KvCache>,
    ids: Vec<u32>,
    fused: Fused,
}

enum Fused {
    /// Not for this model (or turned off).
    No,
    /// Ready to take over from the tensor path's cache after the prompt.
    Ready(Box<FusedDecoder>),
    /// Holds the sequence's cache now.
    Active(Box<FusedDecoder>),
}

impl<'a> Decoder<'a> {
    pub(crate) fn new(
        model: &'a Llama,
        params: &'a ParamStore,
        deltas: &'a DeltaSet,
        delta_params: &'a ParamStore,
    ) -> Self {
        let cache = (!deltas.mixes_positions()).then(|| KvCache::new(model.cfg.num_hidden_layers));
        let fused = match cache.is_some() && fused_decode::enabled() {
            true => fused_decoder(model, params, deltas, delta_params)
                .map_or(Fused::No, |f| Fused::Ready(Box::new(f))),
            false => Fused::No,
        };
        Self {
            model,
            params,
            deltas,
            delta_params,
            cache,
            ids: vec![],
            fused,
        }
    }

    /// Whether single tokens after the prompt go through the fused decoder.
    #[cfg(test)]
    pub(crate) fn is_fused(&self) -> bool {
        !matches!(self.fused, Fused::No)
    }

    /// Append `new` tokens; the greedy token after them: `argmax(next_logits(new))`, computed
    /// without every logit where the fused decoder can (see `model::head_screen`).
    pub(crate) fn next_greedy(&mut self, new: &[u32]) -> Result<u32> {
        self.fused_takes_over()?;
        if let Fused::Active(f) = &mut self.fused {
            let mut next = None;
            for &id in new {
                next = Some(f.step_greedy(id)?);
            }
            return next.ok_or_else(|| Error::invalid("no new tokens to decode"));
        }
        Ok(argmax(&self.next_logits(new)?))
    }

    /// After the prompt, the fused decoder (if any) takes over the tensor path's cache.
    fn fused_takes_over(&mut self) -> Result<()> {
        let prompt_done = self.cache.as_ref().is_some_and(|c| !c.is_empty());
        if prompt_done {
            if let Fused::Ready(_) = self.fused {
                let Fused::Ready(f) = std::mem::replace(&mut self.fused, Fused::No) else {
                    unreachable!()
                };
                let cache = self.cache.take().expect("checked above");
                self.fused = Fused::Active(Box::new(f.with_cache(&cache)?));
            }
        }
        Ok(())
    }

    /// Append `new` tokens; the logits `[vocab]` of the token after them.
    pub(crate) fn next_logits(&mut self, new: &[u32]) -> Result<Vec<f32>> {
        self.fused_takes_over()?;
        if let Fused::Active(f) = &mut self.fused {
            let mut logits = vec![];
            for &id in new {
                logits = f.step(id)?;
            }
            return Ok(logits);
        }
        let (m, p, d, dp) = (self.model, self.params, self.deltas, self.delta_params);
        let device = Device::Cpu;
        let ids = &mut self.ids;
        let logits = crate::ops::with_integer_kernels(|| -> Result<Tensor> {
            Ok(match &mut self.cache {
                Some(cache) => {
                    let input = Tensor::new(new, &device)?.unsqueeze(0)?;
                    m.forward_last(p, d, dp, &input, cache)?
                }
                None => {
                    ids.extend_from_slice(new);
                    let input = Tensor::new(ids.as_slice(), &device)?.unsqueeze(0)?;
                    let h = m.forward_hidden(p, d, dp, &input, None, None)?;
                    let t = h.dim(1)?;
                    m.lm_head(p, &h.i((.., t - 1, ..))?.contiguous()?)?
                }
            })
        })?;
        Ok(logits.squeeze(0)?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
    }
}

/// The fused decoder for the base model, or for the base with the deltas merged into a copy of
/// its weights when every delta can be (LoRA, (IA)3, BitFit, TARP bilinear...; equal to the
/// unmerged model up to f32 rounding). Merging copies each matrix a delta touches, for the
/// length of the generation. Anything else decodes on the tensor path.
fn fused_decoder(
    model: &Llama,
    params: &ParamStore,
    deltas: &DeltaSet,
    delta_params: &ParamStore,
) -> Option<FusedDecoder> {
    // Cheap checks first: a base the decoder cannot read is not worth merging into.
    let base = FusedDecoder::new(model, params)?;
    if deltas.is_empty() {
        return Some(base);
    }
    if deltas.is_stochastic() {
        return None;
    }
    let merged = deltas.merge(params, delta_params).ok()?;
    FusedDecoder::new(model, &merged)
}

/// Pick the next token: argmax at temperature 0, else sample after temperature, top-k and top-p.
pub fn choose(logits: &[f32], opts: &GenerateOptions, rng: &mut StdRng) -> u32 {
    if opts.temperature == 0.0 {
        return argmax(logits);
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if let Some(k) = opts.top_k.filter(|&k| k > 0) {
        idx.truncate(k);
    }
    let t = opts.temperature as f32;
    let max = logits[idx[0]] / t;
    let mut probs: Vec<f32> = idx.iter().map(|&i| (logits[i] / t - max).exp()).collect();
    let sum: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= sum);
    if let Some(p) = opts.top_p {
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (i, q) in probs.iter().enumerate() {
            acc += q;
            if acc >= p as f32 {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        idx.truncate(keep);
        let s: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= s);
    }
    let r: f32 = rng.random();
    let mut acc = 0.0;
    for (i, q) in probs.iter().enumerate() {
        acc += q;
        if r < acc {
            return idx[i] as u32;
        }
    }
    idx[probs.len() - 1] as u32
}

pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// The `n` most likely tokens and their log-softmax values.
pub fn top_logprobs(logits: &[f32], n: usize) -> Step {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let lse = max
        + logits
            .iter()
            .map(|&x| ((x - max) as f64).exp())
            .sum::<f64>()
            .ln() as f32;
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    let n = n.min(logits.len());
    idx.select_nth_unstable_by(n.saturating_sub(1), |&a, &b| {
        logits[b].total_cmp(&logits[a])
    });
    idx.truncate(n);
    idx.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    Step {
        ids: idx.iter().map(|&i| i as u32).collect(),
        logprobs: idx.iter().map(|&i| logits[i] - lse).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_filters() {
        let logits = [0.0f32, 3.0, 1.0, 2.9];
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(choose(&logits, &GenerateOptions::default(), &mut rng), 1);
        let top1 = GenerateOptions {
            temperature: 1.0,
            top_k: Some(1),
            ..Default::default()
        };
        for _ in 0..20 {
            assert_eq!(choose(&logits, &top1, &mut rng), 1);
        }
        let nucleus = GenerateOptions {
            temperature: 1.0,
            top_p: Some(0.5),
            ..Default::default()
        };
        for _ in 0..50 {
            let t = choose(&logits, &nucleus, &mut rng);
            assert!(t == 1 || t == 3, "{t}");
        }
    }

    #[test]
    fn sampling_is_seeded() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let o = GenerateOptions {
            temperature: 1.0,
            seed: 7,
            ..Default::default()
        };
        let run = || {
            let mut rng = StdRng::seed_from_u64(o.seed);
            (0..30)
                .map(|_| choose(&logits, &o, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn logprobs_are_normalised_and_sorted() {
        let logits = [1.0f32, 2.0, 3.0];
        let s = top_logprobs(&logits, 2);
        assert_eq!(s.ids, vec![2, 1]);
        let total: f32 = [1.0f32, 2.0, 3.0].iter().map(|x| (x - 3.0f32).exp()).sum();
        assert!((s.logprobs[0] + total.ln()).abs() < 1e-6);
    }
}
