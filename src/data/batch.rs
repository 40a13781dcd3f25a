//! Turning examples into token batches: causal-LM windows, prompt -> completion sequences with the
//! loss on the completion only, (pair) classification inputs for encoders and decoders, and
//! token-classification inputs with word -> sub-token label alignment. Truncations are counted so
//! the caller can warn about them. [`BatchOrder`] picks the items of each step, optionally
//! length-bucketed.

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

/// Keep at most `max_len` tokens of an encoder input, keeping its last token (`[SEP]`).
/// Returns whether anything was cut.
pub fn truncate_keep_last<T: Copy>(v: &mut Vec<T>, max_len: usize) -> bool {
    if v.len() <= max_len || max_len < 2 {
        return false;
    }
    let last = v[v.len() - 1];
    v.truncate(max_len - 1);
    v.push(last);
    true
}

/// A classification input, tokenized once: ids and the label's index.
#[derive(Clone, Debug, PartialEq)]
pub struct ClsItem {
    pub ids: Vec<u32>,
    pub label: usize,
}

/// Encoder classification items: `[CLS] text [SEP] (pair [SEP])`, at most `max_len` tokens.
/// Returns the items and how many were truncated.
pub fn encoder_items(
    tok: &TextTokenizer,
    examples: &[Example],
    labels: &[String],
    max_len: usize,
) -> Result<(Vec<ClsItem>, usize)> {
    let mut out = vec![];
    let mut truncated = 0;
    for e in examples {
        let Content::Labeled { text, pair, label } = &e.content else {
            return Err(Error::invalid("classification needs labelled examples"));
        };
        let mut ids = match pair {
            Some(p) => tok
                .inner()
                .encode((text.as_str(), p.as_str()), true)
                .map_err(|e| Error::invalid(format!("tokenizer: {e}")))?
                .get_ids()
                .to_vec(),
            None => tok.encode(text, true)?,
        };
        truncated += truncate_keep_last(&mut ids, max_len) as usize;
        out.push(ClsItem {
            ids,
            label: label_index(labels, label)?,
        });
    }
    Ok((out, truncated))
}

/// Decoder classification items: the prompt `template(text, pair)` as ids, truncated from the
/// left (the end of the prompt, next to the answer, is kept) to `max_len` tokens.
pub fn decoder_items(
    tok: &TextTokenizer,
    examples: &[Example],
    labels: &[String],
    template: &dyn Fn(&str, Option<&str>) -> String,
    max_len: usize,
) -> Result<(Vec<ClsItem>, usize)> {
    let mut out = vec![];
    let mut truncated = 0;
    for e in examples {
        let Content::Labeled { text, pair, label } = &e.content else {
            return Err(Error::invalid("classification needs labelled examples"));
        };
        let mut ids = tok.encode(&template(text, pair.as_deref()), true)?;
        if ids.len() > max_len {
            truncated += 1;
            ids.drain(..ids.len() - max_len);
        }
        out.push(ClsItem {
            ids,
            label: label_index(labels, label)?,
        });
    }
    Ok((out, truncated))
}

fn label_index(labels: &[String], label: &str) -> Result<usize> {
    labels.iter().position(|l| l == label).ok_or_else(|| {
        Error::invalid(format!(
            "label `{label}` is not in the label set ({} labels: {})",
            labels.len(),
            labels.join(", ")
        ))
    })
}

/// Right-pad id sequences: `(ids [n, t], mask [n, t], lengths)`.
pub fn pad_ids(seqs: &[&[u32]], pad: u32) -> Result<(Tensor, Tensor, Vec<usize>)> {
    let t = seqs.iter().map(|s| s.len()).max().unwrap_or(1).max(1);
    let n = seqs.len();
    let mut ids = Vec::with_capacity(n * t);
    let mut mask = Vec::with_capacity(n * t);
    for s in seqs {
        ids.extend(s.iter().copied().chain(std::iter::repeat(pad)).take(t));
        mask.extend((0..t).map(|i| (i < s.len()) as u32));
    }
    let d = Device::Cpu;
    Ok((
        Tensor::from_vec(ids, (n, t), &d)?,
        Tensor::from_vec(mask, (n, t), &d)?,
        seqs.iter().map(|s| s.len()).collect(),
    ))
}

/// A token-classification input: sub-word ids, the word each token belongs to, the aligned
/// targets (tag index on the first sub-token of a word, `IGNORE` elsewhere) and the gold tags.
#[derive(Clone, Debug, PartialEq)]
pub struct TagItem {
    pub ids: Vec<u32>,
    pub word_of: Vec<Option<usize>>,
    pub targets: Vec<i64>,
    pub gold: Vec<String>,
}

/// Hugging Face's alignment: the first sub-token of each word carries the word's tag; later
/// sub-tokens of the same word and special tokens (`None`) get `IGNORE`.
pub fn align_labels(word_of: &[Option<usize>], word_tags: &[i64]) -> Vec<i64> {
    let mut prev = None;
    word_of
        .iter()
        .map(|w| {
            let t = match w {
                Some(w) if Some(*w) != prev => word_tags.get(*w).copied().unwrap_or(IGNORE),
                _ => IGNORE,
            };
            prev = *w;
            t
        })
        .collect()
}

/// Token-classification items from pre-split words (special tokens added), at most `max_len`
/// tokens. Words cut off by truncation keep their gold tags (they count as missed entities).
/// Returns the items and how many sentences were truncated.
pub fn tagged_items(
    tok: &TextTokenizer,
    examples: &[Example],
    tags: &[String],
    max_len: usize,
) -> Result<(Vec<TagItem>, usize)> {
    let mut out = vec![];
    let mut truncated = 0;
    for e in examples {
        let Content::Tagged { tokens, tags: gold } = &e.content else {
            return Err(Error::invalid(
                "token classification needs tagged (word, tag) examples",
            ));
        };
        let words: Vec<&str> = tokens.iter().map(String::as_str).collect();
        let enc = tok
            .inner()
            .encode(&words[..], true)
            .map_err(|e| Error::invalid(format!("tokenizer: {e}")))?;
        let mut ids = enc.get_ids().to_vec();
        let mut word_of: Vec<Option<usize>> = enc
            .get_word_ids()
            .iter()
            .map(|w| w.map(|w| w as usize))
            .collect();
        let cut = truncate_keep_last(&mut ids, max_len);
        truncate_keep_last(&mut word_of, max_len);
        let covered = word_of.iter().flatten().max().map_or(0, |w| w + 1);
        truncated += (cut || covered < words.len()) as usize;
        let idx: Vec<i64> = gold
            .iter()
            .map(|t| label_index(tags, t).map(|i| i as i64))
            .collect::<Result<_>>()?;
        out.push(TagItem {
            targets: align_labels(&word_of, &idx),
            ids,
            word_of,
            gold: gold.clone(),
        });
    }
    Ok((out, truncated))
}

/// Which training items step `step`, micro-batch `micro` uses: a seeded permutation per epoch,
/// a pure function of (seed, step), so resumed runs replay exactly.
///
/// With lengths, batches are *length-bucketed*: each epoch's permutation is cut into chunks of
/// `BUCKET_BATCHES` batches, each chunk is sorted by length (so a batch holds items of similar
/// length and pads little), and the batches of a chunk are put in a seeded random order.
#[derive(Debug)]
pub struct BatchOrder {
    n: usize,
    batch: usize,
    accum: usize,
    seed: u64,
    lengths: Option<Vec<usize>>,
    perms: std::collections::HashMap<usize, Vec<usize>>,
}

/// Batches per sorting chunk when bucketing.
pub const BUCKET_BATCHES: usize = 8;

impl BatchOrder {
    pub fn new(n: usize, batch: usize, accum: usize, seed: u64) -> Self {
        Self {
            n,
            batch: batch.max(1),
            accum: accum.max(1),
            seed,
            lengths: None,
            perms: Default::default(),
        }
    }

    /// Bucket by these item lengths (one per item).
    pub fn with_lengths(mut self, lengths: Vec<usize>) -> Self {
        self.lengths = Some(lengths);
        self
    }

    fn epoch_order(&self, epoch: usize) -> Vec<usize> {
        use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
        let mut rng = StdRng::seed_from_u64(self.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9));
        let mut p: Vec<usize> = (0..self.n).collect();
        p.shuffle(&mut rng);
        let Some(len) = &self.lengths else {
            return p;
        };
        let mut out = Vec::with_capacity(self.n);
        for chunk in p.chunks(self.batch * BUCKET_BATCHES) {
            let mut c = chunk.to_vec();
            c.sort_by_key(|&i| (len.get(i).copied().unwrap_or(0), i));
            let mut batches: Vec<&[usize]> = c.chunks(self.batch).collect();
            batches.shuffle(&mut rng);
            out.extend(batches.into_iter().flatten());
        }
        out
    }

    pub fn indices(&mut self, step: usize, micro: usize) -> Vec<usize> {
        if self.n == 0 {
            return vec![];
        }
        let first = (step * self.accum + micro) * self.batch;
        (first..first + self.batch)
            .map(|g| {
                let epoch = g / self.n;
                if !self.perms.contains_key(&epoch) {
                    let p = self.epoch_order(epoch);
                    self.perms.retain(|&e, _| e + 1 >= epoch);
                    self.perms.insert(epoch, p);
                }
                self.perms[&epoch][g % self.n]
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_go_to_the_first_sub_token_of_each_word() {
        // [CLS] Wolf ##gang lives in Ber ##lin [SEP]
        let word_of = [
            None,
            Some(0),
            Some(0),
            Some(1),
            Some(2),
            Some(3),
            Some(3),
            None,
        ];
        let tags = [1, 0, 0, 2];
        assert_eq!(
            align_labels(&word_of, &tags),
            vec![IGNORE, 1, IGNORE, 0, 0, 2, IGNORE, IGNORE]
        );
    }

    #[test]
    fn truncation_keeps_the_last_token() {
        let mut v = vec![101, 1, 2, 3, 4, 102];
        assert!(truncate_keep_last(&mut v, 4));
        assert_eq!(v, vec![101, 1, 2, 102]);
        assert!(!truncate_keep_last(&mut v, 4));
    }

    fn padding(order: &mut BatchOrder, lengths: &[usize], steps: usize) -> usize {
        (0..steps)
            .map(|s| {
                let idx = order.indices(s, 0);
                let max = idx.iter().map(|&i| lengths[i]).max().unwrap();
                idx.iter().map(|&i| max - lengths[i]).sum::<usize>()
            })
            .sum()
    }

    #[test]
    fn bucketing_pads_less_and_is_a_pure_function_of_seed_and_step() {
        let n = 200;
        let lengths: Vec<usize> = (0..n).map(|i| 5 + (i * 37) % 120).collect();
        let (batch, steps) = (8, n / 8 * 3);
        let plain = padding(&mut BatchOrder::new(n, batch, 1, 3), &lengths, steps);
        let mut b = BatchOrder::new(n, batch, 1, 3).with_lengths(lengths.clone());
        let bucketed = padding(&mut b, &lengths, steps);
        assert!(
            bucketed * 4 < plain,
            "bucketed padding {bucketed} vs plain {plain}"
        );
        // Every epoch is still a permutation of all items.
        for epoch in 0..3 {
            let mut seen: Vec<usize> = (0..n / batch)
                .flat_map(|s| b.indices(epoch * n / batch + s, 0))
                .collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..n).collect::<Vec<_>>());
        }
        // A fresh order asked for a late step first (a resumed run) gives the same batch.
        let mut fresh = BatchOrder::new(n, batch, 1, 3).with_lengths(lengths.clone());
        assert_eq!(fresh.indices(57, 0), b.indices(57, 0));
        // Another seed, another order.
        let mut other = BatchOrder::new(n, batch, 1, 4).with_lengths(lengths);
        assert_ne!(
            (0..5).map(|s| other.indices(s, 0)).collect::<Vec<_>>(),
            (0..5).map(|s| b.indices(s, 0)).collect::<Vec<_>>()
        );
    }
}
