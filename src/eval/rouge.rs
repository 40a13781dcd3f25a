//! ROUGE-1/2/L/Lsum with Google `rouge-score` semantics (`use_stemmer=True`): lowercase, every
//! run of characters outside `[a-z0-9]` becomes a space, tokens longer than 3 characters are
//! Porter-stemmed; F1 is `2PR / (P + R)`. ROUGE-Lsum splits on newlines and uses the union LCS.

use std::collections::HashMap;

use super::porter;

#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Score {
    pub precision: f64,
    pub recall: f64,
    pub fmeasure: f64,
}

fn score(hits: f64, pred: f64, target: f64) -> Score {
    let precision = hits / pred.max(1.0);
    let recall = hits / target.max(1.0);
    let fmeasure = if precision + recall > 0.0 {
        2.0 * precision * recall / (precision + recall)
    } else {
        0.0
    };
    Score {
        precision,
        recall,
        fmeasure,
    }
}

/// rouge-score's tokenizer with stemming.
pub fn tokenize(text: &str) -> Vec<String> {
    let lower = text.to_lowercase();
    let cleaned: String = lower
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                ' '
            }
        })
        .collect();
    cleaned
        .split_whitespace()
        .map(|t| {
            if t.len() > 3 {
                porter::stem(t)
            } else {
                t.to_string()
            }
        })
        .filter(|t| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        })
        .collect()
}

fn ngram_counts(tokens: &[String], n: usize) -> HashMap<&[String], usize> {
    let mut m = HashMap::new();
    if tokens.len() >= n {
        for w in tokens.windows(n) {
            *m.entry(w).or_insert(0) += 1;
        }
    }
    m
}

pub fn rouge_n(target: &[String], pred: &[String], n: usize) -> Score {
    let t = ngram_counts(target, n);
    let p = ngram_counts(pred, n);
    let hits: usize = t
        .iter()
        .map(|(g, c)| (*c).min(*p.get(g).unwrap_or(&0)))
        .sum();
    score(
        hits as f64,
        p.values().sum::<usize>() as f64,
        t.values().sum::<usize>() as f64,
    )
}

fn lcs_table(a: &[String], b: &[String]) -> Vec<Vec<usize>> {
    let mut t = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            t[i][j] = if a[i - 1] == b[j - 1] {
                t[i - 1][j - 1] + 1
            } else {
                t[i - 1][j].max(t[i][j - 1])
            };
        }
    }
    t
}

pub fn rouge_l(target: &[String], pred: &[String]) -> Score {
    if target.is_empty() || pred.is_empty() {
        return Score::default();
    }
    let lcs = lcs_table(target, pred)[target.len()][pred.len()];
    score(lcs as f64, pred.len() as f64, target.len() as f64)
}

/// Indices into `r` of one LCS of `r` and `c` (rouge-score's backtracking order).
fn lcs_indices(r: &[String], c: &[String]) -> Vec<usize> {
    let t = lcs_table(r, c);
    let (mut i, mut j) = (r.len(), c.len());
    let mut out = vec![];
    while i > 0 && j > 0 {
        if r[i - 1] == c[j - 1] {
            out.push(i - 1);
            i -= 1;
            j -= 1;
        } else if t[i][j - 1] > t[i - 1][j] {
            j -= 1;
        } else {
            i -= 1;
        }
    }
    out.reverse();
    out
}

pub fn rouge_lsum(target: &str, pred: &str) -> Score {
    let sents = |s: &str| -> Vec<Vec<String>> {
        s.split('\n')
            .filter(|x| !x.is_empty())
            .map(tokenize)
            .collect()
    };
    let (refs, cands) = (sents(target), sents(pred));
    let m: usize = refs.iter().map(Vec::len).sum();
    let n: usize = cands.iter().map(Vec::len).sum();
    if refs.is_empty() || cands.is_empty() || m == 0 || n == 0 {
        return Score::default();
    }
    let mut cnt_r: HashMap<&String, usize> = HashMap::new();
    let mut cnt_c: HashMap<&String, usize> = HashMap::new();
    refs.iter()
        .flatten()
        .for_each(|t| *cnt_r.entry(t).or_default() += 1);
    cands
        .iter()
        .flatten()
        .for_each(|t| *cnt_c.entry(t).or_default() += 1);
    let mut hits = 0usize;
    for r in &refs {
        let mut union: Vec<usize> = cands.iter().flat_map(|c| lcs_indices(r, c)).collect();
        union.sort_unstable();
        union.dedup();
        for i in union {
            let t = &r[i];
            let (cr, cc) = (
                cnt_r.get(t).copied().unwrap_or(0),
                cnt_c.get(t).copied().unwrap_or(0),
            );
            if cr > 0 && cc > 0 {
                hits += 1;
                cnt_r.insert(t, cr - 1);
                cnt_c.insert(t, cc - 1);
            }
        }
    }
    score(hits as f64, n as f64, m as f64)
}

#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Rouge {
    pub rouge1: Score,
    pub rouge2: Score,
    pub rouge_l: Score,
    pub rouge_lsum: Score,
}

/// All four scores of one prediction against one reference.
pub fn rouge(target: &str, pred: &str) -> Rouge {
    let (t, p) = (tokenize(target), tokenize(pred));
    Rouge {
        rouge1: rouge_n(&t, &p, 1),
        rouge2: rouge_n(&t, &p, 2),
        rouge_l: rouge_l(&t, &p),
        rouge_lsum: rouge_lsum(target, pred),
    }
}
