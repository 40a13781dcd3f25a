//! Task families: distributions of tasks built from the shared datasets, split at the *task*
//! level so that meta-train, meta-valid and meta-test tasks never share a domain, topic,
//! language or class; and episodes (support + query) drawn from one task with a seed.

use std::collections::BTreeMap;
use std::path::Path;

use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};

use super::{datasets, Content, Dataset, Example, TaskKind};
use crate::{Error, Result};

/// One task of a family: its examples (all from one domain/topic/language).
#[derive(Clone, Debug)]
pub struct FamilyTask {
    /// A name `adapt` accepts where one exists (`fortunes/science`), else `dataset:group`.
    pub name: String,
    /// What makes the task a task (domain, topic, language); no two splits share one.
    pub group: String,
    pub examples: Vec<Example>,
}

#[derive(Clone, Debug)]
pub struct TaskFamily {
    pub name: String,
    pub kind: TaskKind,
    pub meta_train: Vec<FamilyTask>,
    pub meta_valid: Vec<FamilyTask>,
    pub meta_test: Vec<FamilyTask>,
}

impl TaskFamily {
    /// The sorted tag set of a token-classification family, over all its tasks (the head
    /// `prepare` meta-learns scores exactly these).
    pub fn tag_set(&self) -> Vec<String> {
        let mut tags: Vec<String> = self
            .meta_train
            .iter()
            .chain(&self.meta_valid)
            .chain(&self.meta_test)
            .flat_map(|t| &t.examples)
            .flat_map(|e| match &e.content {
                Content::Tagged { tags, .. } => tags.clone(),
                _ => vec![],
            })
            .collect();
        tags.sort();
        tags.dedup();
        tags
    }
}

/// Built-in families: name and description.
pub const FAMILIES: &[(&str, &str)] = &[
    (
        "lm-domains",
        "language modelling, one task per domain: fortunes categories and text corpora; \
         meta-test: fortunes/{science,politics,law,medicine}, meta-valid: fortunes/{education,sports,food}",
    ),
    (
        "summ-domains",
        "summarisation: meta-train DialogSum topics (dialogue), meta-valid SciTLDR (science), meta-test Multi-LexSum (legal)",
    ),
    (
        "dialogue-topics",
        "next-turn generation, one task per DailyDialog topic (topics split 3:1:1 in sorted order)",
    ),
    (
        "intent-clinc",
        "N-way K-shot intent classification, one task per CLINC150 domain (domains split 6:2:2); Banking77 (minus intents CLINC150 also has) is an extra meta-test task",
    ),
    (
        "ner-wikiann",
        "cross-lingual NER: meta-train WikiANN en+de, meta-valid fr, meta-test nl",
    ),
];

const LM_TEST: [&str; 4] = ["science", "politics", "law", "medicine"];
const LM_VALID: [&str; 3] = ["education", "sports", "food"];
/// Too small (under ~30 entries) or not prose.
const LM_SKIP: [&str; 5] = [
    "COPYRIGHT",
    "ascii-art",
    "translate-me",
    "pratchett",
    "paradoxum",
];
const CORPORA: [&str; 4] = ["tinyshakespeare", "wikitext2", "ptb", "pubmedqa"];

/// The first non-empty split among `names`.
fn first_split(ds: &Dataset, names: &[&str]) -> Result<Vec<Example>> {
    names
        .iter()
        .find_map(|s| ds.splits.get(*s).filter(|v| !v.is_empty()).cloned())
        .ok_or_else(|| {
            Error::invalid(format!(
                "task `{}` has none of the splits {names:?}",
                ds.name
            ))
        })
}

fn whole(ds: &Dataset, group: &str) -> Result<FamilyTask> {
    Ok(FamilyTask {
        name: ds.name.clone(),
        group: group.into(),
        examples: first_split(ds, &["train", "validation", "val", "dev", "test"])?,
    })
}

/// One task per group value of `examples` with at least `min` examples, sorted by group.
fn by_group(dataset: &str, examples: &[Example], min: usize) -> Vec<FamilyTask> {
    let mut groups: BTreeMap<String, Vec<Example>> = BTreeMap::new();
    for e in examples {
        if let Some(g) = &e.group {
            groups.entry(g.clone()).or_default().push(e.clone());
        }
    }
    groups
        .into_iter()
        .filter(|(_, v)| v.len() >= min)
        .map(|(g, v)| FamilyTask {
            name: format!("{dataset}:{g}"),
            group: g,
            examples: v,
        })
        .collect()
}

/// Split sorted tasks 3:1:1 by position (every 5th is meta-test, the one before it meta-valid).
fn split_by_position(
    tasks: Vec<FamilyTask>,
) -> (Vec<FamilyTask>, Vec<FamilyTask>, Vec<FamilyTask>) {
    let (mut tr, mut va, mut te) = (vec![], vec![], vec![]);
    for (i, t) in tasks.into_iter().enumerate() {
        match i % 5 {
            4 => te.push(t),
            3 => va.push(t),
            _ => tr.push(t),
        }
    }
    (tr, va, te)
}

/// Load family `name` from `data_dir`.
pub fn load(name: &str, data_dir: &Path) -> Result<TaskFamily> {
    let fam = |kind, (meta_train, meta_valid, meta_test)| TaskFamily {
        name: name.into(),
        kind,
        meta_train,
        meta_valid,
        meta_test,
    };
    Ok(match name {
        "lm-domains" => {
            let dir = data_dir.join("lm/fortunes");
            let mut cats: Vec<String> = std::fs::read_dir(&dir)
                .map_err(|e| Error::file(&dir, e))?
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|c| !LM_SKIP.contains(&c.as_str()) && !c.starts_with('.'))
                .collect();
            cats.sort();
            let (mut tr, mut va, mut te) = (vec![], vec![], vec![]);
            for c in cats {
                let ds = datasets::load(&format!("fortunes/{c}"), data_dir, false)?;
                let t = whole(&ds, &c)?;
                if LM_TEST.contains(&c.as_str()) {
                    te.push(t);
                } else if LM_VALID.contains(&c.as_str()) {
                    va.push(t);
                } else {
                    tr.push(t);
                }
            }
            for c in CORPORA {
                tr.push(whole(&datasets::load(c, data_dir, false)?, c)?);
            }
            fam(TaskKind::LanguageModeling, (tr, va, te))
        }
        "summ-domains" => {
            let ds = datasets::load("dialogsum", data_dir, false)?;
            let tr = by_group("dialogsum", ds.split("train")?, 40);
            let va = vec![whole(
                &datasets::load("scitldr", data_dir, false)?,
                "science",
            )?];
            let te = vec![whole(
                &datasets::load("multilexsum", data_dir, false)?,
                "legal",
            )?];
            fam(TaskKind::PromptCompletion, (tr, va, te))
        }
        "dialogue-topics" => {
            let ds = datasets::load("dailydialog", data_dir, false)?;
            let tasks = by_group("dailydialog", ds.split("train")?, 40);
            fam(TaskKind::PromptCompletion, split_by_position(tasks))
        }
        "intent-clinc" => {
            let ds = datasets::load("clinc150", data_dir, false)?;
            let train: Vec<Example> = ds
                .split("train")?
                .iter()
                .filter(|e| e.label() != Some("oos"))
                .cloned()
                .collect();
            let tasks = by_group("clinc150", &train, 1)
                .into_iter()
                .map(|t| FamilyTask {
                    name: format!("clinc150/{}", t.group),
                    ..t
                })
                .collect();
            let (tr, va, mut te) = split_by_position(tasks);
            // Banking77 shares a few intent names with CLINC150 (`exchange_rate`): drop those
            // classes so no meta-test class was seen in meta-training.
            let seen: std::collections::HashSet<String> = tr
                .iter()
                .chain(&va)
                .flat_map(|t: &FamilyTask| {
                    t.examples
                        .iter()
                        .filter_map(|e| e.label().map(String::from))
                })
                .collect();
            let mut bank = whole(&datasets::load("banking77", data_dir, false)?, "banking77")?;
            bank.examples
                .retain(|e| e.label().is_some_and(|l| !seen.contains(l)));
            te.push(bank);
            fam(TaskKind::Classification, (tr, va, te))
        }
        "ner-wikiann" => {
            let lang = |l: &str| -> Result<FamilyTask> {
                whole(
                    &datasets::load(&format!("wikiann/{l}"), data_dir, false)?,
                    l,
                )
            };
            fam(
                TaskKind::TokenClassification,
                (
                    vec![lang("en")?, lang("de")?],
                    vec![lang("fr")?],
                    vec![lang("nl")?],
                ),
            )
        }
        _ => {
            let names: Vec<&str> = FAMILIES.iter().map(|(n, _)| *n).collect();
            return Err(Error::invalid(format!(
                "unknown task family `{name}`; known: {}",
                names.join(", ")
            )));
        }
    })
}

/// An episode: a support set to adapt on and a disjoint query set to evaluate the adaptation.
#[derive(Clone, Debug)]
pub struct Episode {
    pub task: String,
    pub support: Vec<Example>,
    pub query: Vec<Example>,
}

/// Draw `support` + `query` distinct examples of `task` from `seed` (fewer if it is small,
/// keeping at least one query example).
pub fn episode(task: &FamilyTask, support: usize, query: usize, seed: u64) -> Result<Episode> {
    let n = task.examples.len();
    if n < 2 {
        return Err(Error::invalid(format!(
            "task `{}` has {n} example(s): an episode needs at least 2",
            task.name
        )));
    }
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut StdRng::seed_from_u64(seed));
    let q = query.min(n / 2).max(1);
    let s = support.min(n - q);
    Ok(Episode {
        task: task.name.clone(),
        support: idx[..s].iter().map(|&i| task.examples[i].clone()).collect(),
        query: idx[s..s + q]
            .iter()
            .map(|&i| task.examples[i].clone())
            .collect(),
    })
}

/// An N-way episode of a classification task: `n_way` classes drawn from `seed`, with `support`
/// and `query` examples of each (fewer where a class is small, keeping one query example).
/// Returns the episode and its classes (sorted; label `i` of the episode is `classes[i]`).
pub fn n_way_episode(
    task: &FamilyTask,
    n_way: usize,
    support: usize,
    query: usize,
    seed: u64,
) -> Result<(Episode, Vec<String>)> {
    let mut by: BTreeMap<&str, Vec<&Example>> = BTreeMap::new();
    for e in &task.examples {
        if let Some(l) = e.label() {
            by.entry(l).or_default().push(e);
        }
    }
    by.retain(|_, v| v.len() >= 2);
    if by.len() < 2 {
        return Err(Error::invalid(format!(
            "task `{}` has fewer than 2 classes with 2 examples: no N-way episode",
            task.name
        )));
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut classes: Vec<&str> = by.keys().copied().collect();
    classes.shuffle(&mut rng);
    classes.truncate(n_way.max(2));
    classes.sort_unstable();
    let mut ep = Episode {
        task: task.name.clone(),
        support: vec![],
        query: vec![],
    };
    for c in &classes {
        let mut v = by[c].clone();
        v.shuffle(&mut rng);
        let q = query.min(v.len() / 2).max(1);
        let s = support.min(v.len() - q);
        ep.support.extend(v[..s].iter().map(|e| (*e).clone()));
        ep.query.extend(v[s..s + q].iter().map(|e| (*e).clone()));
    }
    ep.support.shuffle(&mut rng);
    Ok((ep, classes.into_iter().map(String::from).collect()))
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn data_dir() -> std::path::PathBuf {
        crate::assets::data_dir()
    }

    fn groups(ts: &[FamilyTask]) -> HashSet<String> {
        ts.iter()
            .flat_map(|t| {
                std::iter::once(t.group.clone())
                    .chain(t.examples.iter().filter_map(|e| e.group.clone()))
            })
            .collect()
    }

    fn labels(ts: &[FamilyTask]) -> HashSet<String> {
        ts.iter()
            .flat_map(|t| {
                t.examples
                    .iter()
                    .filter_map(|e| e.label().map(String::from))
            })
            .collect()
    }

    /// Meta-train, meta-valid and meta-test never share a task, a group (domain, topic,
    /// language) or a class label.
    #[test]
    fn families_split_at_the_task_level() -> Result<()> {
        for (name, _) in FAMILIES {
            let f = load(name, &data_dir())?;
            assert!(
                !f.meta_train.is_empty() && !f.meta_valid.is_empty() && !f.meta_test.is_empty(),
                "{name}"
            );
            let sets = [&f.meta_train, &f.meta_valid, &f.meta_test];
            for (i, a) in sets.iter().enumerate() {
                for b in &sets[i + 1..] {
                    let (ga, gb) = (groups(a), groups(b));
                    assert!(
                        ga.is_disjoint(&gb),
                        "{name}: shared groups {:?}",
                        ga.intersection(&gb).collect::<Vec<_>>()
                    );
                    let (la, lb) = (labels(a), labels(b));
                    assert!(
                        la.is_disjoint(&lb),
                        "{name}: shared labels {:?}",
                        la.intersection(&lb).collect::<Vec<_>>()
                    );
                    let na: HashSet<&str> = a.iter().map(|t| t.name.as_str()).collect();
                    assert!(b.iter().all(|t| !na.contains(t.name.as_str())), "{name}");
                }
            }
            for t in sets.iter().flat_map(|s| s.iter()) {
                assert!(t.examples.len() >= 2, "{name}: {} is too small", t.name);
            }
        }
        Ok(())
    }

    #[test]
    fn lm_domains_hold_out_the_documented_categories() -> Result<()> {
        let f = load("lm-domains", &data_dir())?;
        let test: Vec<&str> = f.meta_test.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            test,
            [
                "fortunes/law",
                "fortunes/medicine",
                "fortunes/politics",
                "fortunes/science"
            ]
        );
        assert!(f.meta_train.len() >= 25, "{}", f.meta_train.len());
        assert!(f.meta_train.iter().any(|t| t.name == "tinyshakespeare"));
        Ok(())
    }

    #[test]
    fn n_way_episodes_pick_classes_and_balance_them() -> Result<()> {
        let f = load("intent-clinc", &data_dir())?;
        let t = &f.meta_train[0];
        let (e, classes) = n_way_episode(t, 5, 3, 2, 9)?;
        assert_eq!(classes.len(), 5);
        for c in &classes {
            assert_eq!(e.support.iter().filter(|x| x.label() == Some(c)).count(), 3);
            assert_eq!(e.query.iter().filter(|x| x.label() == Some(c)).count(), 2);
        }
        assert!(e.query.iter().all(|q| !e.support.contains(q)));
        assert_eq!(n_way_episode(t, 5, 3, 2, 9)?.1, classes);
        let one = FamilyTask {
            name: "x".into(),
            group: "g".into(),
            examples: t.examples[..3].to_vec(),
        };
        assert!(n_way_episode(&one, 5, 3, 2, 0)
            .unwrap_err()
            .to_string()
            .contains("fewer than 2 classes"));
        Ok(())
    }

    #[test]
    fn episodes_are_seeded_and_disjoint() -> Result<()> {
        let f = load("lm-domains", &data_dir())?;
        let t = &f.meta_train[0];
        let e = episode(t, 8, 4, 3)?;
        assert_eq!((e.support.len(), e.query.len()), (8, 4));
        assert!(e.query.iter().all(|q| !e.support.contains(q)));
        assert_eq!(e.support, episode(t, 8, 4, 3)?.support);
        assert_ne!(e.support, episode(t, 8, 4, 4)?.support);
        let tiny = FamilyTask {
            name: "t".into(),
            group: "g".into(),
            examples: t.examples[..1].to_vec(),
        };
        assert!(episode(&tiny, 8, 4, 0)
            .unwrap_err()
            .to_string()
            .contains("at least 2"));
        assert!(load("nope", &data_dir())
            .unwrap_err()
            .to_string()
            .contains("lm-domains"));
        Ok(())
    }
}
