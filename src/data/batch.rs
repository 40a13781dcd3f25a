//! Turning examples into token batches: causal-LM windows, prompt -> completion sequences with the
//! loss on the completion only, and (pair) classification inputs. Truncations are counted so the
//! caller can warn about them.

use candle_core::{Device, Tensor};

use super::{Content, Example};
use crate::model::TextTokenizer;
use crate::{Error, Result};

pub const IGNORE: i64 = -100;

/// A batch for a causal LM: inputs, targets (already shifted; `IGNORE` where no loss) and mask.
#[derive(Clone, Debug)]
pub struct LmBatch {
    pub input_ids: Tensor,
    pub targets: Tensor,
    pub attention_mask: Tensor,
    /// Tokens that carry a loss.
    pub target_tokens: usize,
}

/// A tokenized training sequence: ids and per-position targets for the next token.
#[derive(Clone, Debug, PartialEq)]
pub struct Sequence {
    pub ids: Vec<u32>,
    pub targets: Vec<i64>,
}

/// Tokenize examples into sequences of at most `max_len` tokens.
/// - text: the whole text plus EOS, split into consecutive windows;
/// - prompt/completion: the prompt (truncated from the left if needed), then completion + EOS,
///   with targets only on the completion.
///
/// Returns the sequences and the number of truncated examples.
pub fn sequences(
    tok: &TextTokenizer,
    examples: &[Example],
    max_len: usize,
) -> Result<(Vec<Sequence>, usize)> {
    if max_len < 2 {
        return Err(Error::invalid("max_len must be at least 2"));
    }
    let eos = tok.eos_ids.first().copied();
    let mut out = vec![];
    let mut truncated = 0;
    for e in examples {
        match &e.content {
            Content::Text { text } => {
                let mut ids = tok.encode(text, false)?;
                ids.extend(eos);
                for chunk in ids.chunks(max_len + 1) {
                    if chunk.len() < 2 {
                        continue;
                    }
                    out.push(Sequence {
                        ids: chunk[..chunk.len() - 1].to_vec(),
                        targets: chunk[1..].iter().map(|&t| t as i64).collect(),
                    });
                }
            }
            Content::PromptCompletion {
                prompt, completion, ..
            } => {
                let mut p = tok.encode(prompt, false)?;
                let mut c = tok.encode(completion, false)?;
                c.extend(eos);
                // Keep at least the start of the completion; drop prompt tokens from the left.
                let budget = max_len + 1;
                if p.len() + c.len() > budget {
                    truncated += 1;
                    let keep_c = c.len().min(budget.saturating_sub(8).max(budget / 2));
                    c.truncate(keep_c);
                    let keep_p = budget - c.len();
                    p.drain(..p.len().saturating_sub(keep_p));
                }
                let all: Vec<u32> = p.iter().chain(&c).copied().collect();
                let targets: Vec<i64> = (1..all.len())
                    .map(|i| if i < p.len() { IGNORE } else { all[i] as i64 })
                    .collect();
                out.push(Sequence {
                    ids: all[..all.len() - 1].to_vec(),
                    targets,
                });
            }
            _ => {
                return Err(Error::invalid(
                    "language-model batches need text or prompt/completion examples",
                ))
            }
        }
    }
    Ok((out, truncated))
}

/// Right-pad sequences into a batch (`pad` id, `IGNORE` targets, mask 0).
pub fn collate(seqs: &[&Sequence], pad: u32) -> Result<LmBatch> {
    let n = seqs.len();
    let t = seqs.iter().map(|s| s.ids.len()).max().unwrap_or(1).max(1);
    let mut ids = Vec::with_capacity(n * t);
    let mut tg = Vec::with_capacity(n * t);
    let mut mask = Vec::with_capacity(n * t);
    let mut count = 0;
    for s in seqs {
        for i in 0..t {
            ids.push(*s.ids.get(i).unwrap_or(&pad));
            let target = *s.targets.get(i).unwrap_or(&IGNORE);
            count += (target != IGNORE) as usize;
            tg.push(target);
            mask.push((i < s.ids.len()) as u32);
        }
    }
    let d = Device::Cpu;
    Ok(LmBatch {
        input_ids: Tensor::from_vec(ids, (n, t), &d)?,
        targets: Tensor::from_vec(tg, (n, t), &d)?,
        attention_mask: Tensor::from_vec(mask, (n, t), &d)?,
        target_tokens: count,
    })
}

/// Encoder classification inputs: `[CLS] text [SEP] (pair [SEP])` padded, with masks and label
/// indices into `labels`.
pub fn classification_batch(
    tok: &TextTokenizer,
    examples: &[&Example],
    labels: &[String],
    pad: u32,
) -> Result<(Tensor, Tensor, Tensor)> {
    let mut seqs = vec![];
    let mut ys = vec![];
    for e in examples {
        let Content::Labeled { text, pair, label } = &e.content else {
            return Err(Error::invalid("classification needs labelled examples"));
        };
        let ids = match pair {
            Some(p) => {
                let enc = tok
                    .inner()
                    .encode((text.as_str(), p.as_str()), true)
                    .map_err(|e| Error::invalid(format!("tokenizer: {e}")))?;
                enc.get_ids().to_vec()
            }
            None => tok.encode(text, true)?,
        };
        let y = labels.iter().position(|l| l == label).ok_or_else(|| {
            Error::invalid(format!(
                "label `{label}` is not in the label set ({} labels)",
                labels.len()
            ))
        })?;
        seqs.push(ids);
        ys.push(y as u32);
    }
    let t = seqs.iter().map(Vec::len).max().unwrap_or(1).max(1);
    let n = seqs.len();
    let mut ids = Vec::with_capacity(n * t);
    let mut mask = Vec::with_capacity(n * t);
    for s in &seqs {
        ids.extend(s.iter().copied().chain(std::iter::repeat(pad)).take(t));
        mask.extend((0..t).map(|i| (i < s.len()) as u32));
    }
    let d = Device::Cpu;
    Ok((
        Tensor::from_vec(ids, (n, t), &d)?,
        Tensor::from_vec(mask, (n, t), &d)?,
        Tensor::from_vec(ys, n, &d)?,
    ))
}
