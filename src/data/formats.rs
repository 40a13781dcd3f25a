//! Readers for the file formats the datasets come in, with `file:line` errors.

use std::io::Read;
use std::path::Path;

use crate::{Error, Result};

/// The text of a file, or of a member of a zip archive when `member` is given.
pub fn read_text(path: &Path, member: Option<&str>) -> Result<String> {
    match member {
        None => std::fs::read_to_string(path)
            .map_err(|e| Error::file(path, format!("cannot read: {e}"))),
        Some(m) => {
            let f = std::fs::File::open(path)
                .map_err(|e| Error::file(path, format!("cannot open: {e}")))?;
            let mut z = zip::ZipArchive::new(f)
                .map_err(|e| Error::file(path, format!("not a valid zip archive: {e}")))?;
            let mut entry = z
                .by_name(m)
                .map_err(|_| Error::file(path, format!("archive has no member `{m}`")))?;
            let mut s = String::new();
            entry
                .read_to_string(&mut s)
                .map_err(|e| Error::file(path, format!("{m}: cannot read: {e}")))?;
            Ok(s)
        }
    }
}

/// A `file:line` (or `file!member:line`) location for messages.
pub fn at(path: &Path, member: Option<&str>, line: usize) -> String {
    match member {
        Some(m) => format!("{}!{m}:{line}", path.display()),
        None => format!("{}:{line}", path.display()),
    }
}

/// Parse every non-empty line with `parse`; a failure names the line, or is counted when
/// `skip_bad`.
pub fn parse_lines<T>(
    path: &Path,
    member: Option<&str>,
    text: &str,
    skip_bad: bool,
    skipped: &mut usize,
    mut parse: impl FnMut(&str) -> std::result::Result<T, String>,
) -> Result<Vec<T>> {
    let mut out = vec![];
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_start_matches('\u{feff}');
        if line.trim().is_empty() {
            continue;
        }
        match parse(line) {
            Ok(v) => out.push(v),
            Err(_) if skip_bad => *skipped += 1,
            Err(e) => {
                return Err(Error::invalid(format!(
                    "{}: {e} (pass --skip-bad to skip malformed records)",
                    at(path, member, i + 1)
                )))
            }
        }
    }
    Ok(out)
}

/// Parse a JSON-lines file, one object per non-empty line, with `f` turning each into a record.
pub fn parse_json_lines<T>(
    path: &Path,
    skip_bad: bool,
    skipped: &mut usize,
    mut f: impl FnMut(&serde_json::Value) -> std::result::Result<T, String>,
) -> Result<Vec<T>> {
    let text = read_text(path, None)?;
    parse_lines(path, None, &text, skip_bad, skipped, |line| {
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
        f(&v)
    })
}

/// A JSON object field as a string.
pub fn field<'a>(v: &'a serde_json::Value, k: &str) -> std::result::Result<&'a str, String> {
    v.get(k)
        .and_then(|x| x.as_str())
        .ok_or_else(|| format!("missing string field `{k}`"))
}

/// Records of a CSV file (RFC 4180 quoting, multi-line fields) with its header; errors name the
/// line.
pub fn csv_records(
    path: &Path,
    text: &str,
    skip_bad: bool,
    skipped: &mut usize,
) -> Result<(Vec<String>, Vec<Vec<String>>)> {
    let mut r = csv::ReaderBuilder::new()
        .flexible(false)
        .from_reader(text.as_bytes());
    let header: Vec<String> = r
        .headers()
        .map_err(|e| Error::file(path, format!("bad CSV header: {e}")))?
        .iter()
        .map(|s| s.trim_start_matches('\u{feff}').to_string())
        .collect();
    let mut rows = vec![];
    for rec in r.records() {
        match rec {
            Ok(rec) => rows.push(rec.iter().map(String::from).collect()),
            Err(_) if skip_bad => *skipped += 1,
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line());
                return Err(Error::invalid(format!(
                    "{}:{line}: bad CSV record: {e}",
                    path.display()
                )));
            }
        }
    }
    Ok((header, rows))
}

/// Sentences of a two-column token/tag file (CoNLL, WikiANN): blank lines separate sentences,
/// `-DOCSTART-` lines are skipped; `strip_prefix` removes a `xx:` language prefix from tokens.
pub fn conll(
    path: &Path,
    text: &str,
    strip_prefix: bool,
    skip_bad: bool,
    skipped: &mut usize,
) -> Result<Vec<(Vec<String>, Vec<String>)>> {
    let mut out = vec![];
    let (mut toks, mut tags) = (vec![], vec![]);
    let mut bad_sentence = false;
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end();
        if line.is_empty() {
            if !toks.is_empty() && !bad_sentence {
                out.push((std::mem::take(&mut toks), std::mem::take(&mut tags)));
            }
            toks.clear();
            tags.clear();
            bad_sentence = false;
            continue;
        }
        if line.starts_with("-DOCSTART-") {
            continue;
        }
        let mut parts = line.split(['\t', ' ']).filter(|s| !s.is_empty());
        let (Some(tok), Some(tag)) = (parts.next(), parts.next_back()) else {
            if skip_bad {
                *skipped += 1;
                bad_sentence = true;
                continue;
            }
            return Err(Error::invalid(format!(
                "{}:{}: expected `token tag`, got {line:?}",
                path.display(),
                i + 1
            )));
        };
        let tok = if strip_prefix {
            tok.split_once(':').map_or(tok, |(p, rest)| {
                if p.len() <= 3 && !rest.is_empty() {
                    rest
                } else {
                    tok
                }
            })
        } else {
            tok
        };
        toks.push(tok.to_string());
        tags.push(tag.to_string());
    }
    if !toks.is_empty() && !bad_sentence {
        out.push((toks, tags));
    }
    Ok(out)
}
