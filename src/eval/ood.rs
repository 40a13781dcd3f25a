//! Out-of-distribution detection metrics. Convention: in-distribution is the positive class and a
//! higher score means "more in-distribution" (max softmax probability, or the negative energy
//! `T * logsumexp(logits / T)`).
//! - AUROC: probability that a random ID sample scores above a random OOD one (ties count 1/2),
//!   which equals scikit-learn's `roc_auc_score`;
//! - AUPR: scikit-learn's `average_precision_score` (ID positive);
//! - FPR@95: the fraction of OOD samples scoring at or above the threshold that keeps 95% of the
//!   ID samples (the first ROC point with TPR >= 0.95).

/// Max softmax probability of each row of logits.
pub fn msp(logits: &[Vec<f32>]) -> Vec<f64> {
    logits
        .iter()
        .map(|row| {
            let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
            let s: f64 = row.iter().map(|&x| (x as f64 - m).exp()).sum();
            1.0 / s
        })
        .collect()
}

/// Negative energy `T * logsumexp(logits / T)` of each row (higher = more in-distribution).
pub fn neg_energy(logits: &[Vec<f32>], t: f64) -> Vec<f64> {
    logits
        .iter()
        .map(|row| {
            let xs: Vec<f64> = row.iter().map(|&x| x as f64 / t).collect();
            let m = xs.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
            t * (m + xs.iter().map(|x| (x - m).exp()).sum::<f64>().ln())
        })
        .collect()
}

/// Scores sorted descending with their labels (true = in-distribution), grouped by equal score.
fn sorted(id: &[f64], ood: &[f64]) -> Vec<(f64, bool)> {
    let mut v: Vec<(f64, bool)> = id
        .iter()
        .map(|&s| (s, true))
        .chain(ood.iter().map(|&s| (s, false)))
        .collect();
    v.sort_by(|a, b| b.0.total_cmp(&a.0));
    v
}

/// Cumulative `(true positives, false positives)` after each distinct threshold, highest first.
fn cumulative_counts(id: &[f64], ood: &[f64]) -> Vec<(f64, f64)> {
    let v = sorted(id, ood);
    let (mut tp, mut fp) = (0.0, 0.0);
    let mut out = vec![];
    let mut i = 0;
    while i < v.len() {
        let s = v[i].0;
        while i < v.len() && v[i].0 == s {
            if v[i].1 {
                tp += 1.0;
            } else {
                fp += 1.0;
            }
            i += 1;
        }
        out.push((tp, fp));
    }
    out
}

/// ROC points `(fpr, tpr)` at every distinct threshold, from the highest score down.
fn roc(id: &[f64], ood: &[f64]) -> Vec<(f64, f64)> {
    let (p, n) = (id.len() as f64, ood.len() as f64);
    std::iter::once((0.0, 0.0))
        .chain(
            cumulative_counts(id, ood)
                .into_iter()
                .map(|(tp, fp)| (fp / n, tp / p)),
        )
        .collect()
}

pub fn auroc(id: &[f64], ood: &[f64]) -> f64 {
    let pts = roc(id, ood);
    pts.windows(2)
        .map(|w| (w[1].0 - w[0].0) * (w[1].1 + w[0].1) / 2.0)
        .sum()
}

pub fn aupr(id: &[f64], ood: &[f64]) -> f64 {
    let p = id.len() as f64;
    let mut prev_recall = 0.0;
    let mut ap = 0.0;
    for (tp, fp) in cumulative_counts(id, ood) {
        let recall = tp / p;
        ap += (recall - prev_recall) * tp / (tp + fp);
        prev_recall = recall;
    }
    ap
}

pub fn fpr_at_95_tpr(id: &[f64], ood: &[f64]) -> f64 {
    roc(id, ood)
        .into_iter()
        .find(|(_, tpr)| *tpr >= 0.95)
        .map_or(1.0, |(fpr, _)| fpr)
}
