//! From a task name to the examples a run trains and evaluates on: split choice, K-shot sample,
//! a seeded evaluation subset, prompt templates and label verbalizers. `adapt` and `eval` share
//! it, so both see the same examples for the same options.

use std::collections::BTreeMap;
use std::path::Path;

use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};

use crate::data::{self, k_shot, Content, Example, TaskKind};
use crate::{Error, Result};

/// The examples of one run.
#[derive(Clone, Debug)]
pub struct TaskData {
    pub name: String,
    pub kind: TaskKind,
    /// Sorted label set of the training split (classification) or tag set of all splits
    /// (token classification); empty otherwise.
    pub labels: Vec<String>,
    pub train: Vec<Example>,
    pub eval: Vec<Example>,
    pub train_split: String,
    pub eval_split: String,
}

/// Load `task` and sample: `shots` per class (classification) or in total for training, and a
/// seeded random subset of at most `eval_limit` evaluation examples (test splits are often sorted).
pub fn task_data(
    task: &str,
    data_dir: &Path,
    shots: usize,
    seed: u64,
    eval_limit: usize,
) -> Result<TaskData> {
    let ds = data::datasets::load(task, data_dir, false)?;
    let nonempty = |s: &str| ds.splits.get(s).is_some_and(|v| !v.is_empty());
    let train_split = ["train", "validation", "val", "dev"]
        .into_iter()
        .find(|s| nonempty(s))
        .ok_or_else(|| Error::invalid(format!("task `{task}` has no training split")))?;
    let eval_split = ["test", "validation", "val", "dev"]
        .into_iter()
        .find(|s| nonempty(s))
        .ok_or_else(|| Error::invalid(format!("task `{task}` has no test/validation split")))?;
    let labels = match ds.kind {
        TaskKind::Classification => {
            let mut l: Vec<String> = ds
                .split(train_split)?
                .iter()
                .filter_map(|e| e.label().map(String::from))
                .collect();
            l.sort();
            l.dedup();
            l
        }
        TaskKind::TokenClassification => {
            let mut l: Vec<String> = ds
                .splits
                .values()
                .flatten()
                .flat_map(|e| match &e.content {
                    Content::Tagged { tags, .. } => tags.clone(),
                    _ => vec![],
                })
                .collect();
            l.sort();
            l.dedup();
            l
        }
        _ => vec![],
    };
    let template = prompt_template(task);
    let apply = |v: Vec<Example>| -> Vec<Example> {
        v.into_iter()
            .map(|mut e| {
                if let Content::PromptCompletion { prompt, .. } = &mut e.content {
                    *prompt = template.replace("{prompt}", prompt);
                }
                e
            })
            .collect()
    };
    let train = apply(k_shot(ds.split(train_split)?, shots, seed));
    let all = ds.split(eval_split)?;
    let eval = if all.len() > eval_limit {
        let mut idx: Vec<usize> = (0..all.len()).collect();
        idx.shuffle(&mut StdRng::seed_from_u64(seed ^ 0x7e57));
        idx.truncate(eval_limit);
        idx.sort_unstable();
        apply(idx.into_iter().map(|i| all[i].clone()).collect())
    } else {
        apply(all.to_vec())
    };
    Ok(TaskData {
        name: task.into(),
        kind: ds.kind,
        labels,
        train,
        eval,
        train_split: train_split.into(),
        eval_split: eval_split.into(),
    })
}

fn family(task: &str) -> &str {
    task.split('/').next().unwrap_or("")
}

/// How prompt->completion examples are shown to a decoder.
pub fn prompt_template(task: &str) -> &'static str {
    match family(task) {
        "dialogsum" | "scitldr" | "multilexsum" => "{prompt}\nSummary:",
        "dailydialog" | "multiwoz" | "persona-chat" => "{prompt}\n",
        _ => "{prompt}",
    }
}

/// The prompt a decoder classifies: the label (verbalizer) follows it directly.
pub fn classification_prompt(task: &str, text: &str, pair: Option<&str>) -> String {
    let pair = pair.unwrap_or("");
    match family(task) {
        "sst2" => format!("Review: {text}\nSentiment:"),
        "cola" => format!("Sentence: {text}\nIs this sentence grammatical? Answer:"),
        "mrpc" => format!(
            "Sentence 1: {text}\nSentence 2: {pair}\nDo both sentences mean the same? Answer:"
        ),
        "rte" => format!("{text}\nQuestion: {pair} True or false?\nAnswer:"),
        "qnli" => format!(
            "Question: {text}\nSentence: {pair}\nDoes the sentence answer the question? Answer:"
        ),
        "clinc150" | "banking77" => format!("Query: {text}\nIntent:"),
        _ if pair.is_empty() => format!("Text: {text}\nLabel:"),
        _ => format!("Text: {text}\nSecond text: {pair}\nLabel:"),
    }
}

/// The words a label is scored by (with a leading space, as they follow the prompt). `custom`
/// (from `--verbalizers label=word,...`) wins; then per-task defaults; then the label itself
/// with `_` as spaces.
pub fn verbalizer(task: &str, label: &str, custom: &BTreeMap<String, String>) -> String {
    if let Some(w) = custom.get(label) {
        return format!(" {}", w.trim());
    }
    let w = match (family(task), label) {
        ("sst2", "0") => "negative",
        ("sst2", "1") => "positive",
        ("cola" | "mrpc", "0") | ("qnli", "not_entailment") => "no",
        ("cola" | "mrpc", "1") | ("qnli", "entailment") => "yes",
        ("rte", "entailment") => "true",
        ("rte", "not_entailment") => "false",
        _ => return format!(" {}", label.replace('_', " ")),
    };
    format!(" {w}")
}

/// Token ids of every label's verbalizer, checked: `custom` may only name known labels, and no
/// two labels may share (or tokenize to) the same words.
pub fn verbalizer_ids(
    tok: &crate::model::TextTokenizer,
    task: &str,
    labels: &[String],
    custom: &BTreeMap<String, String>,
) -> Result<Vec<Vec<u32>>> {
    if let Some(k) = custom.keys().find(|k| !labels.contains(k)) {
        return Err(Error::invalid(format!(
            "--verbalizers names label `{k}`, which task `{task}` does not have (labels: {})",
            labels.join(", ")
        )));
    }
    let mut out: Vec<Vec<u32>> = vec![];
    for l in labels {
        let words = verbalizer(task, l, custom);
        let ids = tok.encode(&words, false)?;
        if ids.is_empty() {
            return Err(Error::invalid(format!(
                "the verbalizer of label `{l}` is empty"
            )));
        }
        if let Some(j) = out.iter().position(|o| *o == ids) {
            return Err(Error::invalid(format!(
                "labels `{}` and `{l}` have the same verbalizer `{}`; give them different words with --verbalizers",
                labels[j],
                words.trim()
            )));
        }
        out.push(ids);
    }
    Ok(out)
}

/// Parse `label=word,label=word`.
pub fn parse_verbalizers(s: &str) -> Result<BTreeMap<String, String>> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            let (l, w) = p.split_once('=').ok_or_else(|| {
                Error::invalid(format!("verbalizer `{p}` is not of the form label=word"))
            })?;
            Ok((l.trim().to_string(), w.trim().to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbalizers_defaults_and_overrides() {
        let none = BTreeMap::new();
        assert_eq!(verbalizer("sst2", "1", &none), " positive");
        assert_eq!(
            verbalizer("clinc150/banking", "freeze_account", &none),
            " freeze account"
        );
        let c = parse_verbalizers("0=terrible, 1=great").unwrap();
        assert_eq!(verbalizer("sst2", "0", &c), " terrible");
        assert!(parse_verbalizers("0:bad").is_err());
    }
}
