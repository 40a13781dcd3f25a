//! Task data: examples of four kinds, loaders for every shared dataset in its original format,
//! generic JSONL/CSV/text loaders, and deterministic K-shot sampling.
//!
//! Every loader names the file and line of a malformed record; with `skip_bad` such records are
//! skipped and counted instead.

pub mod batch;
pub mod datasets;
pub mod family;
pub mod formats;
pub mod pylit;

use std::collections::BTreeMap;

use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// What an example holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Content {
    /// Causal language modelling on raw text.
    Text { text: String },
    /// Prompt -> completion (summarisation, dialogue response); loss on the completion only.
    PromptCompletion {
        prompt: String,
        completion: String,
        references: Vec<String>,
    },
    /// Sequence classification, optionally of a text pair.
    Labeled {
        text: String,
        pair: Option<String>,
        label: String,
    },
    /// Token classification (BIO tags), one tag per word.
    Tagged {
        tokens: Vec<String>,
        tags: Vec<String>,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Example {
    pub content: Content,
    /// The domain, topic, persona, language or category the example belongs to (task families
    /// split on it).
    pub group: Option<String>,
}

impl Example {
    pub fn label(&self) -> Option<&str> {
        match &self.content {
            Content::Labeled { label, .. } => Some(label),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    LanguageModeling,
    PromptCompletion,
    Classification,
    TokenClassification,
}

/// A dataset with named splits.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub name: String,
    pub kind: TaskKind,
    pub splits: BTreeMap<String, Vec<Example>>,
    /// Records skipped as malformed (only with `skip_bad`).
    pub skipped: usize,
}

impl Dataset {
    pub fn split(&self, name: &str) -> Result<&[Example]> {
        let s = self.splits.get(name).ok_or_else(|| {
            Error::invalid(format!(
                "dataset `{}` has no split `{name}` (it has: {})",
                self.name,
                self.splits.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })?;
        if s.is_empty() {
            return Err(Error::invalid(format!(
                "split `{name}` of `{}` is empty",
                self.name
            )));
        }
        Ok(s)
    }

    /// The sorted label set of a classification dataset (over all splits).
    pub fn labels(&self) -> Vec<String> {
        let mut l: Vec<String> = self
            .splits
            .values()
            .flatten()
            .filter_map(|e| e.label().map(String::from))
            .collect();
        l.sort();
        l.dedup();
        l
    }

    /// Keep only examples whose group is `group` (e.g. one CLINC150 domain, one WikiANN language).
    pub fn restrict_to_group(&mut self, group: &str) -> Result<()> {
        for v in self.splits.values_mut() {
            v.retain(|e| e.group.as_deref() == Some(group));
        }
        if self.splits.values().all(Vec::is_empty) {
            return Err(Error::invalid(format!(
                "dataset `{}` has no group `{group}`",
                self.name
            )));
        }
        self.name = format!("{}/{group}", self.name);
        Ok(())
    }

    pub fn groups(&self) -> Vec<String> {
        let mut g: Vec<String> = self
            .splits
            .values()
            .flatten()
            .filter_map(|e| e.group.clone())
            .collect();
        g.sort();
        g.dedup();
        g
    }
}

/// Deterministic K-shot sample from `seed`: `k` examples per label for classification, else `k`
/// examples. Order within the result is shuffled too.
pub fn k_shot(examples: &[Example], k: usize, seed: u64) -> Vec<Example> {
    let mut rng = StdRng::seed_from_u64(seed);
    let labeled = examples.iter().any(|e| e.label().is_some());
    let mut out = if labeled {
        let mut by: BTreeMap<&str, Vec<&Example>> = BTreeMap::new();
        for e in examples {
            by.entry(e.label().unwrap_or("")).or_default().push(e);
        }
        let mut out = vec![];
        for v in by.values_mut() {
            v.shuffle(&mut rng);
            out.extend(v.iter().take(k).map(|e| (*e).clone()));
        }
        out
    } else {
        let mut v: Vec<&Example> = examples.iter().collect();
        v.shuffle(&mut rng);
        v.into_iter().take(k).cloned().collect()
    };
    out.shuffle(&mut rng);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(t: &str, l: &str) -> Example {
        Example {
            content: Content::Labeled {
                text: t.into(),
                pair: None,
                label: l.into(),
            },
            group: None,
        }
    }

    #[test]
    fn k_shot_is_per_class_and_seeded() {
        let data: Vec<Example> = (0..30)
            .map(|i| ex(&format!("t{i}"), ["a", "b", "c"][i % 3]))
            .collect();
        let s = k_shot(&data, 4, 7);
        assert_eq!(s.len(), 12);
        for l in ["a", "b", "c"] {
            assert_eq!(s.iter().filter(|e| e.label() == Some(l)).count(), 4);
        }
        assert_eq!(s, k_shot(&data, 4, 7));
        assert_ne!(s, k_shot(&data, 4, 8));
    }
}
