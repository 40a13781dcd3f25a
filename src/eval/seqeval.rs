//! Entity-level precision, recall and F1 for BIO-style tag sequences with seqeval's default
//! (conlleval-compatible, non-strict) chunking: an `I-` after `O` or after another type starts an
//! entity, `E-`/`S-` close one, and a type change ends the current entity. Micro-averaged over
//! all entities of all sequences.

use std::collections::BTreeSet;

/// `(type, start, end)` spans, end inclusive.
pub type Span = (String, usize, usize);

fn split(tag: &str) -> (char, String) {
    let mut chars = tag.chars();
    let head = chars.next().unwrap_or('O');
    let rest: String = chars.collect();
    let ty = rest
        .split_once('-')
        .map(|(_, t)| t.to_string())
        .unwrap_or_default();
    (head, if ty.is_empty() { "_".into() } else { ty })
}

fn end_of_chunk(prev: char, tag: char, prev_ty: &str, ty: &str) -> bool {
    matches!(prev, 'E' | 'S')
        || (matches!(prev, 'B' | 'I') && matches!(tag, 'B' | 'S' | 'O'))
        || (prev != 'O' && prev != '.' && prev_ty != ty)
}

fn start_of_chunk(prev: char, tag: char, prev_ty: &str, ty: &str) -> bool {
    matches!(tag, 'B' | 'S')
        || (matches!(prev, 'E' | 'S' | 'O') && matches!(tag, 'E' | 'I'))
        || (tag != 'O' && tag != '.' && prev_ty != ty)
}

/// Entity spans of one tag sequence.
pub fn entities(tags: &[&str]) -> Vec<Span> {
    let mut out = vec![];
    let (mut prev, mut prev_ty, mut begin) = ('O', String::from("_"), 0);
    for (i, tag) in tags.iter().chain(std::iter::once(&"O")).enumerate() {
        let (t, ty) = split(tag);
        if end_of_chunk(prev, t, &prev_ty, &ty) {
            out.push((prev_ty.clone(), begin, i - 1));
        }
        if start_of_chunk(prev, t, &prev_ty, &ty) {
            begin = i;
        }
        prev = t;
        prev_ty = ty;
    }
    out
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Prf {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
}

/// Micro precision/recall/F1 over sequences of tags.
pub fn prf(pred: &[Vec<String>], gold: &[Vec<String>]) -> Prf {
    let collect = |seqs: &[Vec<String>]| -> BTreeSet<(usize, Span)> {
        seqs.iter()
            .enumerate()
            .flat_map(|(k, s)| {
                let tags: Vec<&str> = s.iter().map(String::as_str).collect();
                entities(&tags).into_iter().map(move |e| (k, e))
            })
            .collect()
    };
    let (p, g) = (collect(pred), collect(gold));
    let correct = p.intersection(&g).count() as f64;
    let precision = if p.is_empty() {
        0.0
    } else {
        correct / p.len() as f64
    };
    let recall = if g.is_empty() {
        0.0
    } else {
        correct / g.len() as f64
    };
    let f1 = if precision + recall == 0.0 {
        0.0
    } else {
        2.0 * precision * recall / (precision + recall)
    };
    Prf {
        precision,
        recall,
        f1,
    }
}

/// Token-level accuracy.
pub fn token_accuracy(pred: &[Vec<String>], gold: &[Vec<String>]) -> f64 {
    let (mut ok, mut n) = (0usize, 0usize);
    for (p, g) in pred.iter().zip(gold) {
        ok += p.iter().zip(g).filter(|(a, b)| a == b).count();
        n += g.len();
    }
    if n == 0 {
        0.0
    } else {
        ok as f64 / n as f64
    }
}
