//! The shared datasets (`../shared/data`, see its README), each read in its original format, and
//! the registry of built-in task names.

use std::collections::BTreeMap;
use std::path::Path;

use super::formats::{conll, csv_records, field, parse_json_lines, parse_lines, read_text};
use super::{pylit, Content, Dataset, Example, TaskKind};
use crate::{Error, Result};

/// Built-in task names (`metapeft tasks`); `<...>` parts are chosen by the user.
pub const TASKS: [(&str, &str); 20] = [
    (
        "clinc150",
        "intent classification, 150 intents + oos; `clinc150/<domain>` for one domain",
    ),
    ("banking77", "intent classification, 77 banking intents"),
    ("sst2", "GLUE SST-2 sentiment"),
    ("cola", "GLUE CoLA acceptability"),
    ("mrpc", "GLUE MRPC paraphrase (pairs)"),
    ("rte", "GLUE RTE entailment (pairs)"),
    ("qnli", "GLUE QNLI (pairs; dev only)"),
    ("wikiann/<lang>", "NER, PER/ORG/LOC; lang = en, de, fr, nl"),
    ("conll2003", "CoNLL-2003 English NER"),
    ("dialogsum", "dialogue -> summary; group = topic"),
    ("scitldr", "paper abstract -> one-sentence TLDR"),
    ("multilexsum", "legal document -> summary (test only)"),
    (
        "dailydialog",
        "dialogue context -> next turn; group = topic",
    ),
    (
        "multiwoz",
        "task-oriented dialogue context -> next turn; group = domains",
    ),
    ("persona-chat", "persona + dialogue -> next turn"),
    (
        "fortunes/<category>",
        "language modelling on one fortunes category",
    ),
    ("tinyshakespeare", "language modelling"),
    ("wikitext2", "language modelling (valid/test)"),
    ("ptb", "language modelling (valid/test)"),
    ("pubmedqa", "language modelling on biomedical QA passages"),
];

fn labeled(text: String, pair: Option<String>, label: String, group: Option<String>) -> Example {
    Example {
        content: Content::Labeled { text, pair, label },
        group,
    }
}

fn pc(prompt: String, completion: String, refs: Vec<String>, group: Option<String>) -> Example {
    Example {
        content: Content::PromptCompletion {
            prompt,
            completion,
            references: refs,
        },
        group,
    }
}

fn text(t: String, group: Option<String>) -> Example {
    Example {
        content: Content::Text { text: t },
        group,
    }
}

fn dataset(
    name: &str,
    kind: TaskKind,
    splits: Vec<(&str, Vec<Example>)>,
    skipped: usize,
) -> Dataset {
    Dataset {
        name: name.into(),
        kind,
        splits: splits
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        skipped,
    }
}

/// Load a built-in task by name from `data_dir`.
pub fn load(name: &str, data_dir: &Path, skip_bad: bool) -> Result<Dataset> {
    if !data_dir.is_dir() {
        return Err(Error::file(
            data_dir,
            "datasets directory not found (set --data-dir or METAPEFT_DATA)",
        ));
    }
    let (base, sub) = match name.split_once('/') {
        Some((b, s)) => (b, Some(s)),
        None => (name, None),
    };
    let d = data_dir;
    let mut ds = match base {
        "clinc150" => clinc150(&d.join("intent/clinc150"))?,
        "banking77" => banking77(&d.join("intent/banking77"), skip_bad)?,
        "sst2" | "cola" | "mrpc" | "rte" | "qnli" => glue(&d.join("glue"), base, skip_bad)?,
        "wikiann" => {
            let lang = sub.ok_or_else(|| {
                Error::invalid(
                    "wikiann needs a language: wikiann/en, wikiann/de, wikiann/fr, wikiann/nl",
                )
            })?;
            return wikiann(&d.join("ner/wikiann"), lang, skip_bad);
        }
        "conll2003" => conll2003(&d.join("ner/conll2003-en"), skip_bad)?,
        "dialogsum" => dialogsum(&d.join("summ/dialogsum/DialogSum_Data.zip"), skip_bad)?,
        "scitldr" => scitldr(&d.join("summ/scitldr-a"), skip_bad)?,
        "multilexsum" => multilexsum(&d.join("summ/multilexsum/test.jsonl"), skip_bad)?,
        "dailydialog" => dailydialog(&d.join("dialogue/dailydialog/data.zip"))?,
        "multiwoz" => multiwoz(&d.join("dialogue/multiwoz21"))?,
        "persona-chat" => persona_chat(&d.join("dialogue/synthetic-persona-chat"), skip_bad)?,
        "fortunes" => {
            let cat = sub.ok_or_else(|| {
                Error::invalid("fortunes needs a category, e.g. fortunes/science")
            })?;
            return fortunes(&d.join("lm/fortunes"), cat);
        }
        "tinyshakespeare" => plain_text(
            "tinyshakespeare",
            &[("train", d.join("lm/tinyshakespeare/input.txt"))],
        )?,
        "wikitext2" => plain_text(
            "wikitext2",
            &[
                ("valid", d.join("lm/wikitext-2/valid.txt")),
                ("test", d.join("lm/wikitext-2/test.txt")),
            ],
        )?,
        "ptb" => plain_text(
            "ptb",
            &[
                ("valid", d.join("lm/ptb/ptb.valid.txt")),
                ("test", d.join("lm/ptb/ptb.test.txt")),
            ],
        )?,
        "pubmedqa" => pubmedqa(&d.join("lm/pubmedqa/pqal_test.jsonl"), skip_bad)?,
        other => {
            return Err(Error::invalid(format!(
                "unknown task `{other}` (run `metapeft tasks` for the list)"
            )))
        }
    };
    if let Some(g) = sub {
        ds.restrict_to_group(g)?;
    }
    Ok(ds)
}

/// CLINC150 `data_full.json` (`[text, intent]` rows) with `domains.json` as groups; out-of-scope
/// queries keep the label `oos` and the group `oos`.
pub fn clinc150(dir: &Path) -> Result<Dataset> {
    let path = dir.join("data_full.json");
    let v: serde_json::Value = serde_json::from_str(&read_text(&path, None)?)
        .map_err(|e| Error::file(&path, format!("invalid JSON: {e}")))?;
    let dpath = dir.join("domains.json");
    let domains: BTreeMap<String, Vec<String>> = serde_json::from_str(&read_text(&dpath, None)?)
        .map_err(|e| Error::file(&dpath, format!("invalid JSON: {e}")))?;
    let domain_of: BTreeMap<&str, &str> = domains
        .iter()
        .flat_map(|(d, is)| is.iter().map(move |i| (i.as_str(), d.as_str())))
        .collect();
    let rows = |key: &str| -> Result<Vec<Example>> {
        let arr = v
            .get(key)
            .and_then(|a| a.as_array())
            .ok_or_else(|| Error::file(&path, format!("missing `{key}`")))?;
        arr.iter()
            .enumerate()
            .map(|(i, r)| {
                let (t, l) = (
                    r.get(0).and_then(|x| x.as_str()),
                    r.get(1).and_then(|x| x.as_str()),
                );
                let (Some(t), Some(l)) = (t, l) else {
                    return Err(Error::file(
                        &path,
                        format!("`{key}`[{i}] is not a [text, intent] pair"),
                    ));
                };
                let group = if l == "oos" {
                    "oos"
                } else {
                    domain_of.get(l).copied().unwrap_or("unknown")
                };
                Ok(labeled(t.into(), None, l.into(), Some(group.into())))
            })
            .collect()
    };
    let mut splits = vec![];
    for s in ["train", "val", "test"] {
        let mut v = rows(s)?;
        v.extend(rows(&format!("oos_{s}"))?);
        splits.push((s, v));
    }
    Ok(dataset("clinc150", TaskKind::Classification, splits, 0))
}

pub fn banking77(dir: &Path, skip_bad: bool) -> Result<Dataset> {
    let mut skipped = 0;
    let mut splits = vec![];
    for s in ["train", "test"] {
        let path = dir.join(format!("{s}.csv"));
        let (header, rows) = csv_records(&path, &read_text(&path, None)?, skip_bad, &mut skipped)?;
        if header != ["text", "category"] {
            return Err(Error::file(
                &path,
                format!("expected header text,category, got {header:?}"),
            ));
        }
        splits.push((
            s,
            rows.into_iter()
                .map(|r| labeled(r[0].clone(), None, r[1].clone(), None))
                .collect(),
        ));
    }
    Ok(dataset(
        "banking77",
        TaskKind::Classification,
        splits,
        skipped,
    ))
}

/// GLUE TSVs in their official layouts (CoLA has no header; MRPC starts with a BOM; QNLI is
/// dev only). Fields are tab-separated and unquoted.
pub fn glue(dir: &Path, task: &str, skip_bad: bool) -> Result<Dataset> {
    let (folder, splits): (&str, &[&str]) = match task {
        "sst2" => ("SST-2", &["train", "dev"]),
        "cola" => ("CoLA", &["train", "dev"]),
        "mrpc" => ("MRPC", &["train", "dev"]),
        "rte" => ("RTE", &["train", "dev"]),
        _ => ("QNLI", &["dev"]),
    };
    let mut skipped = 0;
    let mut out = vec![];
    for s in splits {
        let path = dir.join(folder).join(format!("{s}.tsv"));
        let text = read_text(&path, None)?;
        let has_header = task != "cola";
        let body: String = if has_header {
            text.lines().skip(1).collect::<Vec<_>>().join("\n")
        } else {
            text.clone()
        };
        let rows = parse_lines(&path, None, &body, skip_bad, &mut skipped, |line| {
            let f: Vec<&str> = line.split('\t').collect();
            let need = match task {
                "sst2" => 2,
                "cola" => 4,
                "mrpc" => 5,
                _ => 4,
            };
            if f.len() < need {
                return Err(format!(
                    "expected {need} tab-separated fields, got {}",
                    f.len()
                ));
            }
            Ok(match task {
                "sst2" => labeled(f[0].trim().into(), None, f[1].trim().into(), None),
                "cola" => labeled(f[3].into(), None, f[1].into(), None),
                "mrpc" => labeled(f[3].into(), Some(f[4].into()), f[0].into(), None),
                _ => labeled(f[1].into(), Some(f[2].into()), f[3].trim().into(), None),
            })
        })
        .map_err(|e| line_offset(e, has_header))?;
        out.push((*s, rows));
    }
    Ok(dataset(task, TaskKind::Classification, out, skipped))
}

/// `parse_lines` counted from the first data line; add the header back to line numbers.
fn line_offset(e: Error, header: bool) -> Error {
    if !header {
        return e;
    }
    let msg = e.to_string();
    let fixed = (|| {
        let (loc, rest) = msg.split_once(": ")?;
        let (file, line) = loc.rsplit_once(':')?;
        let n: usize = line.parse().ok()?;
        Some(format!("{file}:{}: {rest}", n + 1))
    })();
    Error::invalid(fixed.unwrap_or(msg))
}

pub fn wikiann(dir: &Path, lang: &str, skip_bad: bool) -> Result<Dataset> {
    let mut skipped = 0;
    let mut splits = vec![];
    for s in ["train", "dev", "test"] {
        let path = dir.join(lang).join(s);
        let sents = conll(
            &path,
            &read_text(&path, None)?,
            true,
            skip_bad,
            &mut skipped,
        )?;
        splits.push((
            s,
            sents
                .into_iter()
                .map(|(tokens, tags)| Example {
                    content: Content::Tagged { tokens, tags },
                    group: Some(lang.into()),
                })
                .collect(),
        ));
    }
    Ok(dataset(
        &format!("wikiann/{lang}"),
        TaskKind::TokenClassification,
        splits,
        skipped,
    ))
}

pub fn conll2003(dir: &Path, skip_bad: bool) -> Result<Dataset> {
    let mut skipped = 0;
    let mut splits = vec![];
    for s in ["train", "dev", "test"] {
        let path = dir.join(format!("{s}.txt"));
        let sents = conll(
            &path,
            &read_text(&path, None)?,
            false,
            skip_bad,
            &mut skipped,
        )?;
        splits.push((
            s,
            sents
                .into_iter()
                .map(|(tokens, tags)| Example {
                    content: Content::Tagged { tokens, tags },
                    group: None,
                })
                .collect(),
        ));
    }
    Ok(dataset(
        "conll2003",
        TaskKind::TokenClassification,
        splits,
        skipped,
    ))
}

/// DialogSum: every line is a Python dict literal; the test split has three reference summaries.
pub fn dialogsum(zip: &Path, skip_bad: bool) -> Result<Dataset> {
    let mut skipped = 0;
    let mut splits = vec![];
    for (s, file) in [("train", "train"), ("validation", "dev"), ("test", "test")] {
        let member = format!("DialogSum_Data/dialogsum.{file}.jsonl");
        let text = read_text(zip, Some(&member))?;
        let rows = parse_lines(zip, Some(&member), &text, skip_bad, &mut skipped, |line| {
            let v = pylit::parse(line)?;
            let dialogue = field(&v, "dialogue")?.to_string();
            let refs: Vec<String> = ["summary", "summary1", "summary2", "summary3"]
                .iter()
                .filter_map(|k| v.get(*k).and_then(|x| x.as_str()).map(String::from))
                .collect();
            let first = refs.first().cloned().ok_or("no summary field")?;
            let topic = v
                .get("topic")
                .or_else(|| v.get("topic1"))
                .and_then(|x| x.as_str())
                .map(String::from);
            Ok(pc(dialogue, first, refs, topic))
        })?;
        splits.push((s, rows));
    }
    Ok(dataset(
        "dialogsum",
        TaskKind::PromptCompletion,
        splits,
        skipped,
    ))
}

pub fn scitldr(dir: &Path, skip_bad: bool) -> Result<Dataset> {
    let mut skipped = 0;
    let mut splits = vec![];
    for (s, file) in [("train", "train"), ("validation", "dev"), ("test", "test")] {
        let path = dir.join(format!("{file}.jsonl"));
        let rows = parse_json_lines(&path, skip_bad, &mut skipped, |v| {
            let src: Vec<&str> = v
                .get("source")
                .and_then(|x| x.as_array())
                .ok_or("missing `source`")?
                .iter()
                .filter_map(|x| x.as_str())
                .collect();
            let refs: Vec<String> = v
                .get("target")
                .and_then(|x| x.as_array())
                .ok_or("missing `target`")?
                .iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect();
            let first = refs.first().cloned().ok_or("empty `target`")?;
            Ok(pc(src.join(" "), first, refs, Some("science".into())))
        })?;
        splits.push((s, rows));
    }
    Ok(dataset(
        "scitldr",
        TaskKind::PromptCompletion,
        splits,
        skipped,
    ))
}

pub fn multilexsum(path: &Path, skip_bad: bool) -> Result<Dataset> {
    let mut skipped = 0;
    let rows = parse_json_lines(path, skip_bad, &mut skipped, |v| {
        let s = field(v, "summary")?.to_string();
        Ok(pc(
            field(v, "document")?.into(),
            s.clone(),
            vec![s],
            Some("legal".into()),
        ))
    })?;
    Ok(dataset(
        "multilexsum",
        TaskKind::PromptCompletion,
        vec![("test", rows)],
        skipped,
    ))
}

pub fn pubmedqa(path: &Path, skip_bad: bool) -> Result<Dataset> {
    let mut skipped = 0;
    let rows = parse_json_lines(path, skip_bad, &mut skipped, |v| {
        let t = format!(
            "Question: {}\n{}\nAnswer: {}",
            field(v, "question")?,
            field(v, "passage")?,
            field(v, "answer")?
        );
        Ok(text(t, Some("biomedical".into())))
    })?;
    Ok(dataset(
        "pubmedqa",
        TaskKind::LanguageModeling,
        vec![("test", rows)],
        skipped,
    ))
}

/// Dialogue turns -> (context, next turn) at the last turn.
fn dialogue_example(turns: &[String], group: Option<String>) -> Option<Example> {
    let (last, ctx) = turns.split_last()?;
    if ctx.is_empty() {
        return None;
    }
    Some(pc(ctx.join("\n"), last.clone(), vec![last.clone()], group))
}

/// DailyDialog in ConvLab's unified format; the group is the dialogue's first topic.
pub fn dailydialog(zip: &Path) -> Result<Dataset> {
    let member = "data/dialogues.json";
    let v: serde_json::Value = serde_json::from_str(&read_text(zip, Some(member))?)
        .map_err(|e| Error::file(zip, format!("{member}: invalid JSON: {e}")))?;
    let mut splits: BTreeMap<String, Vec<Example>> = BTreeMap::new();
    for d in v
        .as_array()
        .ok_or_else(|| Error::file(zip, "dialogues.json is not a list"))?
    {
        let split = d
            .get("data_split")
            .and_then(|x| x.as_str())
            .unwrap_or("train")
            .to_string();
        let topic = d
            .get("domains")
            .and_then(|x| x.as_array())
            .and_then(|a| a.first())
            .and_then(|x| x.as_str())
            .map(String::from);
        let turns: Vec<String> = d
            .get("turns")
            .and_then(|x| x.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|t| {
                        t.get("utterance")
                            .and_then(|u| u.as_str())
                            .map(String::from)
                    })
                    .collect()
            })
            .unwrap_or_default();
        if let Some(e) = dialogue_example(&turns, topic) {
            splits.entry(split).or_default().push(e);
        }
    }
    Ok(Dataset {
        name: "dailydialog".into(),
        kind: TaskKind::PromptCompletion,
        splits,
        skipped: 0,
    })
}

/// MultiWOZ 2.1 (val and test archives); the group lists the domains the goal uses.
pub fn multiwoz(dir: &Path) -> Result<Dataset> {
    let mut splits = vec![];
    for (s, file) in [("validation", "val"), ("test", "test")] {
        let zip = dir.join(format!("{file}.json.zip"));
        let member = format!("{file}.json");
        let v: serde_json::Value = serde_json::from_str(&read_text(&zip, Some(&member))?)
            .map_err(|e| Error::file(&zip, format!("{member}: invalid JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| Error::file(&zip, "not a JSON object of dialogues"))?;
        let mut rows = vec![];
        for d in obj.values() {
            let mut domains: Vec<&str> = d
                .get("goal")
                .and_then(|g| g.as_object())
                .map(|g| {
                    g.iter()
                        .filter(|(k, v)| {
                            !["message", "topic"].contains(&k.as_str())
                                && v.as_object().is_some_and(|o| !o.is_empty())
                        })
                        .map(|(k, _)| k.as_str())
                        .collect()
                })
                .unwrap_or_default();
            domains.sort_unstable();
            let turns: Vec<String> = d
                .get("log")
                .and_then(|l| l.as_array())
                .map(|a| {
                    a.iter()
                        .filter_map(|t| t.get("text").and_then(|x| x.as_str()).map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            if let Some(e) = dialogue_example(&turns, Some(domains.join("+"))) {
                rows.push(e);
            }
        }
        splits.push((s, rows));
    }
    Ok(dataset("multiwoz", TaskKind::PromptCompletion, splits, 0))
}

/// Synthetic-Persona-Chat CSV: both personas plus the conversation so far -> the last turn.
pub fn persona_chat(dir: &Path, skip_bad: bool) -> Result<Dataset> {
    let mut skipped = 0;
    let mut splits = vec![];
    for (s, file) in [("validation", "valid"), ("test", "test")] {
        let path = dir.join(format!("{file}.csv"));
        let (header, rows) = csv_records(&path, &read_text(&path, None)?, skip_bad, &mut skipped)?;
        if header.len() < 3 {
            return Err(Error::file(
                &path,
                format!("expected 3 columns, got header {header:?}"),
            ));
        }
        let mut out = vec![];
        for r in rows {
            let turns: Vec<String> = r[2]
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(String::from)
                .collect();
            let persona = format!(
                "Persona of User 1:\n{}\nPersona of User 2:\n{}\n",
                r[0], r[1]
            );
            if let Some(Example {
                content:
                    Content::PromptCompletion {
                        prompt,
                        completion,
                        references,
                    },
                ..
            }) = dialogue_example(&turns, None)
            {
                out.push(pc(
                    format!("{persona}{prompt}"),
                    completion,
                    references,
                    Some(r[1].lines().next().unwrap_or("").to_string()),
                ));
            }
        }
        splits.push((s, out));
    }
    Ok(dataset(
        "persona-chat",
        TaskKind::PromptCompletion,
        splits,
        skipped,
    ))
}

/// One fortunes category: entries separated by lines holding `%`. No official split: every
/// tenth entry is test, the next one validation.
pub fn fortunes(dir: &Path, category: &str) -> Result<Dataset> {
    let path = dir.join(category);
    if !path.is_file() || category == "COPYRIGHT" {
        let mut cats: Vec<String> = std::fs::read_dir(dir)
            .map(|r| {
                r.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n != "COPYRIGHT")
                    .collect()
            })
            .unwrap_or_default();
        cats.sort();
        return Err(Error::invalid(format!(
            "no fortunes category `{category}` (have: {})",
            cats.join(", ")
        )));
    }
    let bytes = std::fs::read(&path).map_err(|e| Error::file(&path, e))?;
    let t = String::from_utf8_lossy(&bytes);
    let entries: Vec<String> = t
        .split("\n%\n")
        .map(|e| e.trim_matches('\n').to_string())
        .filter(|e| !e.trim().is_empty() && e != "%")
        .collect();
    let mut splits: BTreeMap<String, Vec<Example>> = BTreeMap::new();
    for (i, e) in entries.into_iter().enumerate() {
        let s = match i % 10 {
            0 => "test",
            1 => "validation",
            _ => "train",
        };
        splits
            .entry(s.into())
            .or_default()
            .push(text(e, Some(category.into())));
    }
    Ok(Dataset {
        name: format!("fortunes/{category}"),
        kind: TaskKind::LanguageModeling,
        splits,
        skipped: 0,
    })
}

/// Plain text corpora: paragraphs (blank-line separated; each line for line-per-sentence files).
pub fn plain_text(name: &str, files: &[(&str, std::path::PathBuf)]) -> Result<Dataset> {
    let mut splits = vec![];
    for (s, path) in files {
        let t = read_text(path, None)?;
        let paras: Vec<Example> = if t.contains("\n\n") {
            t.split("\n\n")
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(|p| text(p.to_string(), Some(name.into())))
                .collect()
        } else {
            t.lines()
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(|p| text(p.to_string(), Some(name.into())))
                .collect()
        };
        splits.push((*s, paras));
    }
    Ok(dataset(name, TaskKind::LanguageModeling, splits, 0))
}

/// A user's JSONL file with named fields: `text` (LM), `prompt`+`completion`, or `text` (+
/// `pair`) + `label`.
pub fn jsonl(path: &Path, fields: &Fields, skip_bad: bool) -> Result<Dataset> {
    let mut skipped = 0;
    let rows = parse_json_lines(path, skip_bad, &mut skipped, |v| {
        fields.example(|k| {
            v.get(k).map(|x| {
                x.as_str()
                    .map(String::from)
                    .unwrap_or_else(|| x.to_string())
            })
        })
    })?;
    Ok(dataset(
        &path.display().to_string(),
        fields.kind(),
        vec![("train", rows)],
        skipped,
    ))
}

/// A user's CSV file with named columns (see [`Fields`]).
pub fn csv_file(path: &Path, fields: &Fields, skip_bad: bool) -> Result<Dataset> {
    let mut skipped = 0;
    let (header, rows) = csv_records(path, &read_text(path, None)?, skip_bad, &mut skipped)?;
    let col = |k: &str| header.iter().position(|h| h == k);
    let mut out = vec![];
    for (i, r) in rows.iter().enumerate() {
        match fields.example(|k| col(k).and_then(|c| r.get(c).cloned())) {
            Ok(e) => out.push(e),
            Err(_) if skip_bad => skipped += 1,
            Err(e) => {
                return Err(Error::invalid(format!(
                    "{}: record {}: {e}",
                    path.display(),
                    i + 1
                )))
            }
        }
    }
    Ok(dataset(
        &path.display().to_string(),
        fields.kind(),
        vec![("train", out)],
        skipped,
    ))
}

/// Which columns of a user's file hold what.
#[derive(Clone, Debug, Default)]
pub struct Fields {
    pub text: Option<String>,
    pub pair: Option<String>,
    pub label: Option<String>,
    pub prompt: Option<String>,
    pub completion: Option<String>,
}

impl Fields {
    fn kind(&self) -> TaskKind {
        if self.prompt.is_some() {
            TaskKind::PromptCompletion
        } else if self.label.is_some() {
            TaskKind::Classification
        } else {
            TaskKind::LanguageModeling
        }
    }

    fn example(
        &self,
        get: impl Fn(&str) -> Option<String>,
    ) -> std::result::Result<Example, String> {
        let need = |k: &Option<String>| -> std::result::Result<String, String> {
            let k = k.as_deref().ok_or("no column named")?;
            get(k).ok_or_else(|| format!("missing field `{k}`"))
        };
        Ok(match self.kind() {
            TaskKind::PromptCompletion => {
                let c = need(&self.completion)?;
                pc(need(&self.prompt)?, c.clone(), vec![c], None)
            }
            TaskKind::Classification => labeled(
                need(&self.text)?,
                self.pair.as_deref().and_then(&get),
                need(&self.label)?,
                None,
            ),
            _ => text(need(&self.text)?, None),
        })
    }
}
