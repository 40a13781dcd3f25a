//! Dataset loaders on the real shared datasets (`../shared/data`, or METAPEFT_DATA): sizes from
//! the datasets' own documentation, example contents, groups, and malformed input.

mod common;

use std::path::PathBuf;

use metapeft::data::datasets::{self, Fields};
use metapeft::data::{k_shot, Content, TaskKind};

fn data_dir() -> PathBuf {
    let d = metapeft::assets::data_dir();
    assert!(
        d.is_dir(),
        "shared datasets not found at {} (set METAPEFT_DATA)",
        d.display()
    );
    d
}

fn sizes(name: &str) -> Vec<(String, usize)> {
    let ds = datasets::load(name, &data_dir(), false).unwrap_or_else(|e| panic!("{name}: {e}"));
    ds.splits
        .iter()
        .map(|(k, v)| (k.clone(), v.len()))
        .collect()
}

fn s(v: &[(&str, usize)]) -> Vec<(String, usize)> {
    v.iter().map(|(k, n)| (k.to_string(), *n)).collect()
}

#[test]
fn documented_sizes() {
    // CLINC150: 15000/3000/4500 in-scope plus 100/100/1000 out-of-scope.
    assert_eq!(
        sizes("clinc150"),
        s(&[("test", 5500), ("train", 15100), ("val", 3100)])
    );
    assert_eq!(sizes("banking77"), s(&[("test", 3080), ("train", 10003)]));
    assert_eq!(
        sizes("dialogsum"),
        s(&[("test", 500), ("train", 12460), ("validation", 500)])
    );
    assert_eq!(
        sizes("scitldr"),
        s(&[("test", 618), ("train", 1992), ("validation", 619)])
    );
    assert_eq!(sizes("multilexsum"), s(&[("test", 868)]));
    assert_eq!(
        sizes("wikiann/de"),
        s(&[("dev", 10000), ("test", 10000), ("train", 20000)])
    );
    assert_eq!(sizes("pubmedqa"), s(&[("test", 500)]));
    let dd = sizes("dailydialog");
    assert_eq!(dd.iter().map(|x| x.1).sum::<usize>(), 13118, "{dd:?}");
    let mw = sizes("multiwoz");
    assert_eq!(mw, s(&[("test", 1000), ("validation", 999)]));
}

#[test]
fn contents_and_groups() {
    let d = data_dir();
    let mut clinc = datasets::load("clinc150/banking", &d, false).unwrap();
    assert_eq!(clinc.name, "clinc150/banking");
    assert_eq!(clinc.labels().len(), 15);
    assert_eq!(clinc.split("train").unwrap().len(), 1500);
    assert!(clinc.restrict_to_group("travel").is_err());
    let all = datasets::load("clinc150", &d, false).unwrap();
    assert_eq!(
        all.groups().len(),
        11,
        "10 domains + oos: {:?}",
        all.groups()
    );

    let mrpc = datasets::load("mrpc", &d, false).unwrap();
    let Content::Labeled { text, pair, label } = &mrpc.split("train").unwrap()[0].content else {
        panic!()
    };
    assert!(text.starts_with("Amrozi") || !text.is_empty());
    assert!(pair.is_some() && (label == "0" || label == "1"), "{label}");
    let cola = datasets::load("cola", &d, false).unwrap();
    assert_eq!(cola.split("train").unwrap().len(), 8551);
    assert_eq!(
        datasets::load("qnli", &d, false).unwrap().labels(),
        vec!["entailment", "not_entailment"]
    );

    let ds = datasets::load("dialogsum", &d, false).unwrap();
    let Content::PromptCompletion {
        prompt, references, ..
    } = &ds.split("test").unwrap()[0].content
    else {
        panic!()
    };
    assert!(prompt.starts_with("#Person1#:"));
    assert_eq!(references.len(), 3, "test has three reference summaries");
    assert!(ds.groups().len() > 100, "topics");

    let w = datasets::load("wikiann/fr", &d, false).unwrap();
    assert_eq!(w.kind, TaskKind::TokenClassification);
    let Content::Tagged { tokens, tags } = &w.split("train").unwrap()[0].content else {
        panic!()
    };
    assert_eq!(tokens.len(), tags.len());
    assert!(
        tokens.iter().all(|t| !t.starts_with("fr:")),
        "language prefix stripped: {tokens:?}"
    );
    let conll = datasets::load("conll2003", &d, false).unwrap();
    let Content::Tagged { tokens, .. } = &conll.split("train").unwrap()[0].content else {
        panic!()
    };
    assert_eq!(tokens[0], "EU");

    let f = datasets::load("fortunes/science", &d, false).unwrap();
    assert_eq!(f.kind, TaskKind::LanguageModeling);
    assert!(f.split("train").unwrap().len() > 100);
    let err = datasets::load("fortunes/nonsense", &d, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("science"), "lists the categories: {err}");
    for name in [
        "tinyshakespeare",
        "wikitext2",
        "ptb",
        "persona-chat",
        "sst2",
        "rte",
    ] {
        let ds = datasets::load(name, &d, false).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(ds.splits.values().all(|v| !v.is_empty()), "{name}");
    }
    let pc = datasets::load("persona-chat", &d, false).unwrap();
    let Content::PromptCompletion {
        prompt, completion, ..
    } = &pc.split("validation").unwrap()[0].content
    else {
        panic!()
    };
    assert!(
        prompt.contains("Persona of User 1") && completion.starts_with("User"),
        "{completion}"
    );
}

#[test]
fn k_shot_from_real_data_is_reproducible() {
    let ds = datasets::load("banking77", &data_dir(), false).unwrap();
    let a = k_shot(ds.split("train").unwrap(), 5, 1);
    assert_eq!(a.len(), 77 * 5);
    assert_eq!(a, k_shot(ds.split("train").unwrap(), 5, 1));
}

#[test]
fn malformed_records_name_the_file_and_line() {
    let dir = common::temp_dir("data-bad");
    let p = dir.join("user.jsonl");
    std::fs::write(&p, "{\"text\": \"good one\", \"label\": \"a\"}\n{\"text\": \"broken\", \n{\"text\": \"no label\"}\n").unwrap();
    let fields = Fields {
        text: Some("text".into()),
        label: Some("label".into()),
        ..Default::default()
    };
    let err = datasets::jsonl(&p, &fields, false).unwrap_err().to_string();
    assert!(
        err.contains("user.jsonl:2") && err.contains("--skip-bad"),
        "{err}"
    );
    let ds = datasets::jsonl(&p, &fields, true).unwrap();
    assert_eq!(ds.skipped, 2);
    assert_eq!(ds.splits["train"].len(), 1);

    let c = dir.join("user.csv");
    std::fs::write(
        &c,
        "prompt,completion\n\"multi\nline\",done\nonly-one-field\n",
    )
    .unwrap();
    let f2 = Fields {
        prompt: Some("prompt".into()),
        completion: Some("completion".into()),
        ..Default::default()
    };
    let err = datasets::csv_file(&c, &f2, false).unwrap_err().to_string();
    assert!(err.contains("user.csv:4"), "{err}");
    let ds = datasets::csv_file(&c, &f2, true).unwrap();
    assert_eq!(ds.skipped, 1);
    let Content::PromptCompletion { prompt, .. } = &ds.splits["train"][0].content else {
        panic!()
    };
    assert_eq!(prompt, "multi\nline");

    // A GLUE TSV with a short line reports the right line number (header counted).
    let g = dir.join("glue/SST-2");
    std::fs::create_dir_all(&g).unwrap();
    std::fs::write(
        g.join("train.tsv"),
        "sentence\tlabel\ngood movie\t1\nno label here\n",
    )
    .unwrap();
    std::fs::write(g.join("dev.tsv"), "sentence\tlabel\nfine\t1\n").unwrap();
    let err = datasets::glue(&dir.join("glue"), "sst2", false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("train.tsv:3"), "{err}");
    // An empty split is an error when asked for.
    std::fs::write(g.join("dev.tsv"), "sentence\tlabel\n").unwrap();
    std::fs::write(g.join("train.tsv"), "sentence\tlabel\ngood\t1\n").unwrap();
    let ds = datasets::glue(&dir.join("glue"), "sst2", false).unwrap();
    assert!(ds.split("dev").unwrap_err().to_string().contains("empty"));
    assert!(datasets::load("no-such-task", &data_dir(), false)
        .unwrap_err()
        .to_string()
        .contains("metapeft tasks"));
}

#[test]
fn tags_align_to_the_first_sub_token_with_the_real_minilm_tokenizer() {
    use metapeft::data::batch::{tagged_items, IGNORE};
    use metapeft::data::Example;
    let tok = &common::minilm().tokenizer;
    let words = ["Schwarzenegger", "visited", "Ouagadougou", "."];
    let tags = ["B-PER", "O", "B-LOC", "O"];
    let ex = Example {
        content: Content::Tagged {
            tokens: words.iter().map(|s| s.to_string()).collect(),
            tags: tags.iter().map(|s| s.to_string()).collect(),
        },
        group: None,
    };
    let set: Vec<String> = ["B-LOC", "B-PER", "O"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let (items, truncated) = tagged_items(tok, std::slice::from_ref(&ex), &set, 64).unwrap();
    assert_eq!(truncated, 0);
    let it = &items[0];
    let pieces: Vec<String> = it
        .ids
        .iter()
        .map(|&i| tok.decode(&[i], false).unwrap())
        .collect();
    // Both names split into several word pieces; [CLS] and [SEP] belong to no word.
    assert!(it.ids.len() > words.len() + 3, "{pieces:?}");
    assert_eq!(it.word_of.first(), Some(&None));
    assert_eq!(it.word_of.last(), Some(&None));
    let labelled: Vec<(usize, i64)> = it
        .targets
        .iter()
        .enumerate()
        .filter(|(_, &t)| t != IGNORE)
        .map(|(i, &t)| (i, t))
        .collect();
    // Exactly one labelled token per word, the first of its pieces, with the word's tag.
    assert_eq!(labelled.len(), words.len(), "{pieces:?}");
    for (w, (pos, t)) in labelled.iter().enumerate() {
        assert_eq!(it.word_of[*pos], Some(w));
        assert!(*pos == 0 || it.word_of[pos - 1] != Some(w));
        assert_eq!(set[*t as usize], tags[w]);
    }
    // Truncation keeps [SEP], and the lost words are counted.
    let (items, truncated) = tagged_items(tok, &[ex], &set, 4).unwrap();
    assert_eq!(truncated, 1);
    assert_eq!(items[0].ids.len(), 4);
    assert_eq!(items[0].word_of[3], None);
}

#[test]
fn classification_items_truncate_with_counts_keeping_sep_or_the_prompt_end() {
    use metapeft::data::batch::{decoder_items, encoder_items};
    use metapeft::data::Example;
    let ex = |t: &str, l: &str| Example {
        content: Content::Labeled {
            text: t.into(),
            pair: None,
            label: l.into(),
        },
        group: None,
    };
    let labels: Vec<String> = vec!["neg".into(), "pos".into()];
    let data = vec![
        ex("a short one", "pos"),
        ex(
            "this sentence is quite a lot longer than the limit allows",
            "neg",
        ),
    ];
    let tok = &common::minilm().tokenizer;
    let (items, cut) = encoder_items(tok, &data, &labels, 6).unwrap();
    assert_eq!(cut, 1);
    assert_eq!((items[0].label, items[1].label), (1, 0));
    let full = tok
        .encode(
            "this sentence is quite a lot longer than the limit allows",
            true,
        )
        .unwrap();
    assert_eq!(items[1].ids.len(), 6);
    assert_eq!(items[1].ids[..5], full[..5]);
    assert_eq!(items[1].ids[5], *full.last().unwrap(), "[SEP] is kept");
    let template = |t: &str, _: Option<&str>| format!("{t}\nLabel:");
    let (items, cut) = decoder_items(tok, &data, &labels, &template, 7).unwrap();
    assert_eq!(cut, 1);
    let whole = tok
        .encode(
            &template(
                "this sentence is quite a lot longer than the limit allows",
                None,
            ),
            true,
        )
        .unwrap();
    assert_eq!(
        items[1].ids[..],
        whole[whole.len() - 7..],
        "the prompt's end is kept"
    );
    // A label outside the label set is a clear error.
    let err = encoder_items(tok, &[ex("x", "maybe")], &labels, 8)
        .unwrap_err()
        .to_string();
    assert!(err.contains("`maybe`") && err.contains("neg, pos"), "{err}");
}
