//! Accuracy and macro-F1 (scikit-learn semantics: macro over the union of labels seen in
//! references and predictions; a label with no prediction or no reference scores 0).

use std::collections::BTreeSet;

pub fn accuracy<T: PartialEq>(pred: &[T], gold: &[T]) -> f64 {
    if gold.is_empty() {
        return 0.0;
    }
    pred.iter().zip(gold).filter(|(p, g)| p == g).count() as f64 / gold.len() as f64
}

pub fn macro_f1<T: Ord + Clone>(pred: &[T], gold: &[T]) -> f64 {
    let labels: BTreeSet<T> = pred.iter().chain(gold).cloned().collect();
    if labels.is_empty() {
        return 0.0;
    }
    let mut total = 0.0;
    for l in &labels {
        let tp = pred
            .iter()
            .zip(gold)
            .filter(|(p, g)| *p == l && *g == l)
            .count() as f64;
        let fp = pred
            .iter()
            .zip(gold)
            .filter(|(p, g)| *p == l && *g != l)
            .count() as f64;
        let fn_ = pred
            .iter()
            .zip(gold)
            .filter(|(p, g)| *p != l && *g == l)
            .count() as f64;
        let denom = 2.0 * tp + fp + fn_;
        total += if denom == 0.0 { 0.0 } else { 2.0 * tp / denom };
    }
    total / labels.len() as f64
}
