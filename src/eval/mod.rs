//! Metrics: pure functions over predictions and references. Each file follows one reference
//! implementation's semantics and is checked against its numbers on fixed examples
//! (`tests/fixtures/metrics.json`, made by `scripts/reference/metrics_fixtures.py`).

pub mod bleu;
pub mod classification;
pub mod ood;
pub mod perplexity;
pub mod porter;
pub mod rouge;
pub mod seqeval;
