//! Corpus BLEU with sacreBLEU's defaults: the `13a` tokenizer (mteval-v13a), up to 4-grams,
//! counts clipped by the maximum over references, the closest reference length (shortest on a
//! tie), brevity penalty, and `exp` smoothing for zero n-gram matches.

use std::collections::HashMap;

/// sacreBLEU's `13a` tokenization.
pub fn tokenize_13a(line: &str) -> String {
    let mut s = line
        .replace("<skipped>", "")
        .replace("-\n", "")
        .replace('\n', " ");
    if s.contains('&') {
        s = s
            .replace("&quot;", "\"")
            .replace("&amp;", "&")
            .replace("&lt;", "<")
            .replace("&gt;", ">");
    }
    // Punctuation that is always split off: { | } ~ [ \ ] ^ _ ` space ! " # $ % & ( ) * + : ; < = > ? @ /
    let is_punct =
        |c: char| matches!(c, '{'..='~' | '['..='`' | ' '..='&' | '('..='+' | ':'..='@' | '/');
    let chars: Vec<char> = format!(" {s} ").chars().collect();
    let mut out = String::with_capacity(chars.len() * 2);
    for (i, &c) in chars.iter().enumerate() {
        let prev = if i > 0 { chars[i - 1] } else { ' ' };
        let next = chars.get(i + 1).copied().unwrap_or(' ');
        if is_punct(c) {
            out.push(' ');
            out.push(c);
            out.push(' ');
        } else if (c == '.' || c == ',') && (!prev.is_ascii_digit() || !next.is_ascii_digit()) {
            // Period and comma are split unless between two digits.
            out.push(' ');
            out.push(c);
            out.push(' ');
        } else if c == '-' && prev.is_ascii_digit() {
            out.push(' ');
            out.push(c);
            out.push(' ');
        } else {
            out.push(c);
        }
    }
    py_split(&out).join(" ")
}

/// Python's `str.split()`: Unicode whitespace plus the separators U+001C..U+001F.
fn py_split(s: &str) -> Vec<&str> {
    s.split(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
        .filter(|t| !t.is_empty())
        .collect()
}

/// Python's `str.rstrip()`.
fn py_rstrip(s: &str) -> &str {
    s.trim_end_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}

fn ngrams(tokens: &[&str], n: usize) -> HashMap<Vec<String>, usize> {
    let mut m = HashMap::new();
    if tokens.len() >= n {
        for w in tokens.windows(n) {
            *m.entry(w.iter().map(|s| s.to_string()).collect())
                .or_insert(0) += 1;
        }
    }
    m
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Bleu {
    pub score: f64,
    pub counts: [usize; 4],
    pub totals: [usize; 4],
    pub precisions: [f64; 4],
    pub bp: f64,
    pub sys_len: usize,
    pub ref_len: usize,
}

/// Corpus BLEU of `hyps` against one or more reference streams (`refs[k][i]` is the k-th
/// reference of hypothesis i), on a 0-100 scale.
pub fn corpus_bleu(hyps: &[String], refs: &[Vec<String>]) -> Bleu {
    let mut counts = [0usize; 4];
    let mut totals = [0usize; 4];
    let (mut sys_len, mut ref_len) = (0usize, 0usize);
    for (i, h) in hyps.iter().enumerate() {
        let ht = tokenize_13a(py_rstrip(h));
        let hyp: Vec<&str> = ht.split_whitespace().collect();
        let rts: Vec<String> = refs
            .iter()
            .filter_map(|r| r.get(i))
            .map(|r| tokenize_13a(r))
            .collect();
        let rtoks: Vec<Vec<&str>> = rts.iter().map(|r| r.split_whitespace().collect()).collect();
        sys_len += hyp.len();
        // Closest reference length; the shorter one on a tie.
        if let Some(best) = rtoks
            .iter()
            .map(|r| r.len())
            .min_by_key(|&l| ((l as i64 - hyp.len() as i64).abs(), l))
        {
            ref_len += best;
        }
        for n in 1..=4 {
            let h = ngrams(&hyp, n);
            let mut max_ref: HashMap<Vec<String>, usize> = HashMap::new();
            for r in &rtoks {
                for (g, c) in ngrams(r, n) {
                    let e = max_ref.entry(g).or_insert(0);
                    *e = (*e).max(c);
                }
            }
            for (g, c) in &h {
                counts[n - 1] += (*c).min(*max_ref.get(g).unwrap_or(&0));
            }
            totals[n - 1] += hyp.len().saturating_sub(n - 1);
        }
    }
    score(counts, totals, sys_len, ref_len)
}

fn score(counts: [usize; 4], totals: [usize; 4], sys_len: usize, ref_len: usize) -> Bleu {
    let mut precisions = [0.0; 4];
    let mut smooth = 1.0;
    for n in 0..4 {
        if totals[n] == 0 {
            break;
        }
        if counts[n] == 0 {
            smooth *= 2.0;
            precisions[n] = 100.0 / (smooth * totals[n] as f64);
        } else {
            precisions[n] = 100.0 * counts[n] as f64 / totals[n] as f64;
        }
    }
    let bp = if sys_len < ref_len {
        if sys_len == 0 {
            0.0
        } else {
            (1.0 - ref_len as f64 / sys_len as f64).exp()
        }
    } else {
        1.0
    };
    let log = |p: f64| if p == 0.0 { -9_999_999_999.0 } else { p.ln() };
    let s = bp * (precisions.iter().map(|&p| log(p)).sum::<f64>() / 4.0).exp();
    Bleu {
        score: s,
        counts,
        totals,
        precisions,
        bp,
        sys_len,
        ref_len,
    }
}
