//! `metapeft prepare` end to end on a tiny model: every algorithm runs and writes a prepared
//! directory that `adapt --from`, `generate` and `export` accept; meta-training resumes exactly;
//! bad input gives clear errors.

mod common;

use candle_core::{DType, Device};
use metapeft::data::family::{FamilyTask, TaskFamily};
use metapeft::data::{Content, Example, TaskKind};
use metapeft::meta::trainer::Net;
use metapeft::meta::{meta_train, Algo, MetaConfig, MetaModel};
use metapeft::model::{self, Arch, Llama};
use metapeft::peft::config::DeltaConfig;
use metapeft::peft::lora::LoraConfig;

fn prepare(args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["prepare"];
    all.extend_from_slice(args);
    common::metapeft(&all)
}

const SMALL: [&str; 16] = [
    "--meta-steps",
    "2",
    "--meta-batch",
    "2",
    "--inner-steps",
    "1",
    "--support",
    "4",
    "--query",
    "2",
    "--max-len",
    "12",
    "--valid-every",
    "0",
    "--batch-size",
    "2",
];

#[test]
fn every_algorithm_prepares_a_tiny_model() {
    let model = common::tiny_hf_dir("prep-algos", |_, _| {});
    let m = model.to_string_lossy().to_string();
    for algo in Algo::ALL {
        let out = model.join(format!("prep-{algo}"));
        let o = out.to_string_lossy().to_string();
        let mut args = vec!["--model", &m, "--algo", algo, "--out", &o];
        args.extend_from_slice(&SMALL);
        let (code, stdout, stderr) = prepare(&args);
        assert_eq!(code, 0, "{algo}: {stderr}");
        let info = metapeft::io::prepared::read_info(&out).unwrap();
        assert_eq!(info.algo, algo);
        assert_eq!(info.method, if algo == "mltd" { "tarp" } else { "lora" });
        assert!(
            out.join("adapter/metapeft_adapter.json").is_file(),
            "{algo}"
        );
        assert_eq!(
            out.join("model/config.json").is_file(),
            algo == "prime",
            "{algo}"
        );
        assert_eq!(
            out.join("meta_sgd_lrs.safetensors").is_file(),
            algo == "meta-sgd"
        );
        let log = std::fs::read_to_string(out.join("meta-metrics.jsonl")).unwrap();
        assert_eq!(log.lines().count(), 2, "{algo}");
        let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        assert!(
            report["final_query_loss"].as_f64().unwrap().is_finite(),
            "{algo}"
        );
        // The last step was validated on the meta-valid tasks.
        assert_eq!(report["valid"].as_array().unwrap().len(), 1, "{algo}");
    }
}

#[test]
fn mltd_with_tams_saves_cell_controller_and_architectures() {
    let model = common::tiny_hf_dir("prep-tams", |_, _| {});
    let m = model.to_string_lossy().to_string();
    let cfg = model.join("tams.json");
    std::fs::write(
        &cfg,
        r#"{"reduced_dim": 4, "controller_hidden": 8, "layers": [1]}"#,
    )
    .unwrap();
    let out = model.join("prep");
    let o = out.to_string_lossy().to_string();
    let c = cfg.to_string_lossy().to_string();
    let mut args = vec![
        "--model",
        &m,
        "--algo",
        "mltd",
        "--tams-config",
        &c,
        "--out",
        &o,
    ];
    args.extend_from_slice(&SMALL);
    let (code, _, stderr) = prepare(&args);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("TAMS architecture per meta-train task"),
        "{stderr}"
    );
    assert!(stderr.contains("node2 <- "), "{stderr}");
    let archs = metapeft::meta::tams::read_architectures(&out.join("tams")).unwrap();
    let info = metapeft::io::prepared::read_info(&out).unwrap();
    assert_eq!(
        archs.len(),
        info.architectures.unwrap().as_object().unwrap().len()
    );
    assert!(archs.contains_key("tinyshakespeare"));
    let t =
        candle_core::safetensors::load(out.join("tams/tams.safetensors"), &Device::Cpu).unwrap();
    assert!(
        t.contains_key("tams.controller.fc2.weight") && t.contains_key("tams.layers.1.out.weight")
    );
    assert!(!t.keys().any(|k| k.starts_with("tams.layers.0.")));

    // Adapting from it: the controller picks this task's cell, which trains with the delta.
    let run = model.join("adapted");
    let (code, stdout, stderr) = common::metapeft(&[
        "adapt",
        "--from",
        &o,
        "--task",
        "fortunes/science",
        "--shots",
        "4",
        "--steps",
        "2",
        "--max-len",
        "12",
        "--eval-limit",
        "4",
        "--lr",
        "0.05",
        "--out",
        &run.to_string_lossy(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("TAMS cell for this task: node2 <- "),
        "{stderr}"
    );
    let r: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(r["after"].as_f64().unwrap().is_finite());
    let chosen = metapeft::meta::tams::read_architectures(&run.join("tams")).unwrap();
    assert!(chosen.contains_key("fortunes/science"));
    let before = &t["tams.layers.1.edges.0.linear.weight"];
    let after =
        candle_core::safetensors::load(run.join("tams/tams.safetensors"), &Device::Cpu).unwrap();
    let moved = (&after["tams.layers.1.out.weight"] - &t["tams.layers.1.out.weight"]).unwrap();
    assert!(common::l2(&moved) > 0.0, "the cell's weights did not train");
    assert_eq!(
        after["tams.layers.1.edges.0.linear.weight"].dims(),
        before.dims()
    );

    // Export cannot carry the cell: it says so, for the prepared and the adapted model, unless
    // the user drops the cell on purpose.
    let m = model.to_string_lossy().to_string();
    for adapter in [o.clone(), run.join("adapter").to_string_lossy().to_string()] {
        let dest = model.join("exported").to_string_lossy().to_string();
        let args = [
            "export",
            "--model",
            &m,
            "--adapter",
            &adapter,
            "--format",
            "native",
            "--out",
            &dest,
        ];
        let (code, _, err) = common::metapeft(&args);
        assert_eq!(code, 1, "{err}");
        assert!(
            err.contains("TAMS cell") && err.contains("--drop-tams"),
            "{err}"
        );
        let mut dropped = args.to_vec();
        dropped.push("--drop-tams");
        let (code, _, err) = common::metapeft(&dropped);
        assert_eq!(code, 0, "{err}");
        assert!(err.contains("without the TAMS cell"), "{err}");
    }
}

/// An encoder meta-learns N-way intent classification over CLINC150 domains; adapting to a
/// held-out domain starts from the prepared LoRA.
#[test]
fn minilm_prepares_on_n_way_intent_episodes_and_adapts_from_it() {
    let dir = common::temp_dir("prep-minilm");
    let m = common::minilm_path().to_string_lossy().to_string();
    let out = dir.join("prep").to_string_lossy().to_string();
    // 3-way episodes of 2 support and 1 query example per intent, one inner step, no validation.
    let small = [
        "--model",
        &m,
        "--n-way",
        "3",
        "--support",
        "2",
        "--query",
        "1",
        "--inner-steps",
        "1",
        "--batch-size",
        "6",
        "--valid-every",
        "0",
    ];
    let with = |extra: &[&str]| -> Vec<String> {
        small.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let args = with(&[
        "--algo",
        "fomaml",
        "--inner-lr",
        "0.5",
        "--meta-steps",
        "2",
        "--meta-batch",
        "2",
        "--max-len",
        "24",
        "--outer-lr",
        "0.01",
        "--out",
        &out,
    ]);
    let (code, stdout, stderr) = prepare(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("family intent-clinc"), "{stderr}");
    let r: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let v = &r["valid"][0];
    // A 3-way episode starts near chance (ln 3 = 1.10) and the inner loop lowers the query loss.
    assert!(v["loss_before"].as_f64().unwrap() > 0.5, "{v}");
    assert!(
        v["loss_after"].as_f64().unwrap() < v["loss_before"].as_f64().unwrap(),
        "{v}"
    );
    let info = metapeft::io::prepared::read_info(std::path::Path::new(&out)).unwrap();
    assert_eq!(info.family, "intent-clinc");
    let (code, stdout, stderr) = common::metapeft(&[
        "adapt",
        "--from",
        &out,
        "--task",
        "clinc150/work",
        "--shots",
        "2",
        "--steps",
        "2",
        "--eval-limit",
        "20",
        "--max-len",
        "24",
        "--out",
        &dir.join("a").to_string_lossy(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let a: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(a["after"].as_f64().unwrap().is_finite());
    // MLtD with TAMS on the encoder: a bidirectional cell in the last layer, then adaptation with
    // the controller's cell for the held-out domain.
    let tcfg = dir.join("tams.json");
    std::fs::write(
        &tcfg,
        r#"{"reduced_dim": 16, "controller_hidden": 16, "layers": [5]}"#,
    )
    .unwrap();
    let tout = dir.join("t").to_string_lossy().to_string();
    let tc = tcfg.to_string_lossy().to_string();
    let args = with(&[
        "--algo",
        "mltd",
        "--tams-config",
        &tc,
        "--meta-steps",
        "1",
        "--meta-batch",
        "1",
        "--max-len",
        "16",
        "--out",
        &tout,
    ]);
    let (code, _, stderr) = prepare(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 0, "{stderr}");
    let archs = metapeft::meta::tams::read_architectures(&dir.join("t/tams")).unwrap();
    assert!(!archs.is_empty());
    let (code, stdout, stderr) = common::metapeft(&[
        "adapt",
        "--from",
        &tout,
        "--task",
        "clinc150/work",
        "--shots",
        "1",
        "--steps",
        "1",
        "--eval-limit",
        "10",
        "--max-len",
        "16",
        "--out",
        &dir.join("ta").to_string_lossy(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("TAMS cell for this task"), "{stderr}");
    let a: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(a["after"].as_f64().unwrap().is_finite());
}

/// An encoder meta-learns tagging over WikiANN languages: the per-token head is a meta-variable,
/// saved with the prepared model, and `adapt --from` on a held-out language starts from it.
#[test]
fn minilm_meta_learns_a_tagging_head_on_wikiann_and_adapt_starts_from_it() {
    let dir = common::temp_dir("prep-ner");
    let m = common::minilm_path().to_string_lossy().to_string();
    let out = dir.join("prep");
    let o = out.to_string_lossy().to_string();
    let (code, stdout, stderr) = prepare(&[
        "--model",
        &m,
        "--family",
        "ner-wikiann",
        "--support",
        "4",
        "--query",
        "4",
        "--inner-steps",
        "2",
        "--batch-size",
        "4",
        "--meta-steps",
        "2",
        "--meta-batch",
        "2",
        "--max-len",
        "32",
        "--valid-every",
        "0",
        "--out",
        &o,
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("family ner-wikiann"), "{stderr}");
    let r: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let v = &r["valid"][0];
    // From a random head the inner loop lowers the held-out language's query loss.
    assert!(
        v["loss_after"].as_f64().unwrap() < v["loss_before"].as_f64().unwrap(),
        "{v}"
    );
    let head = out.join("head");
    let labels: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(head.join("labels.json")).unwrap()).unwrap();
    assert_eq!(
        labels,
        ["B-LOC", "B-ORG", "B-PER", "I-LOC", "I-ORG", "I-PER", "O"]
    );
    // The saved head is the meta-learned one, not its random initial value.
    let saved = metapeft::io::load_safetensors(&head.join("head.safetensors")).unwrap();
    let w = &saved
        .iter()
        .find(|(n, _)| n == "classifier.weight")
        .unwrap()
        .1;
    // `prepare` draws the head from seed (0) ^ 0x4ead.
    let fresh = metapeft::train::objectives::new_head(7, 384, 0x4ead).unwrap();
    let moved = (w - fresh.get("classifier.weight").unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        moved > 1e-4,
        "the head did not move from its init ({moved})"
    );
    let adapt = |from: &str, tag: &str| {
        common::metapeft(&[
            "adapt",
            "--from",
            from,
            "--task",
            "wikiann/nl",
            "--shots",
            "4",
            "--steps",
            "1",
            "--eval-limit",
            "8",
            "--max-len",
            "32",
            "--out",
            &dir.join(tag).to_string_lossy(),
        ])
    };
    let (code, stdout, stderr) = adapt(&o, "a");
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("meta-learned token_linear head"),
        "{stderr}"
    );
    let a: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(a["after"].as_f64().unwrap().is_finite());
    // A head for another tag set is not forced on the task: a warning and a fresh head.
    std::fs::write(
        head.join("labels.json"),
        r#"["B-LOC","B-MISC","B-PER","I-LOC","I-MISC","I-PER","O"]"#,
    )
    .unwrap();
    let (code, _, stderr) = adapt(&o, "b");
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("not using the prepared head") && stderr.contains("B-ORG"),
        "{stderr}"
    );
}

#[test]
fn adapt_generate_and_export_accept_a_prepared_directory() {
    let model = common::tiny_hf_dir("prep-use", |_, _| {});
    let m = model.to_string_lossy().to_string();
    let prep = model.join("prep");
    let p = prep.to_string_lossy().to_string();
    let mut args = vec![
        "--model",
        &m,
        "--algo",
        "fomaml",
        "--out",
        &p,
        "--outer-lr",
        "0.05",
    ];
    args.extend_from_slice(&SMALL);
    let (code, _, stderr) = prepare(&args);
    assert_eq!(code, 0, "{stderr}");

    let adapt = |from: Option<&str>, out: &str| {
        let mut a = vec![
            "adapt",
            "--task",
            "fortunes/science",
            "--shots",
            "4",
            "--steps",
            "1",
            "--max-len",
            "12",
            "--eval-limit",
            "4",
            "--out",
            out,
        ];
        match from {
            Some(f) => a.extend_from_slice(&["--from", f]),
            None => a.extend_from_slice(&["--model", &m]),
        }
        let (code, stdout, stderr) = common::metapeft(&a);
        assert_eq!(code, 0, "{stderr}");
        serde_json::from_str::<serde_json::Value>(&stdout).unwrap()
    };
    let fresh = adapt(None, &model.join("a-fresh").to_string_lossy());
    let from = adapt(Some(&p), &model.join("a-from").to_string_lossy());
    // A fresh LoRA is the identity; the meta-learned init is not, so perplexity before
    // adaptation differs.
    let (b0, b1) = (
        fresh["before"].as_f64().unwrap(),
        from["before"].as_f64().unwrap(),
    );
    assert!(
        (b0 - b1).abs() > 1e-6,
        "prepared init had no effect: {b0} vs {b1}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("a-from/report.json")).unwrap())
            .unwrap();
    assert_eq!(report["from"].as_str().unwrap(), p);

    let (code, _, stderr) = common::metapeft(&[
        "generate",
        "--model",
        &p,
        "--adapter",
        &p,
        "--prompt",
        "a b",
        "--max-new-tokens",
        "3",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let exp = model.join("exported");
    let (code, _, stderr) = common::metapeft(&[
        "export",
        "--model",
        &p,
        "--adapter",
        &p,
        "--format",
        "peft",
        "--out",
        &exp.to_string_lossy(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(exp.join("adapter_config.json").is_file());

    // A method that contradicts the prepared one is refused.
    let (code, _, stderr) = common::metapeft(&[
        "adapt",
        "--from",
        &p,
        "--method",
        "ia3",
        "--task",
        "fortunes/science",
        "--out",
        &model.join("bad").to_string_lossy(),
    ]);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("differs from the prepared model's method `lora`"),
        "{stderr}"
    );
}

#[test]
fn bad_prepare_input_gives_clear_errors() {
    let model = common::tiny_hf_dir("prep-bad", |_, _| {});
    let m = model.to_string_lossy().to_string();
    let o = model.join("out").to_string_lossy().to_string();
    let cases: [(&[&str], &str); 5] = [
        (
            &["--model", &m, "--algo", "nope", "--out", &o],
            "fomaml, maml, maml-hf",
        ),
        (
            &["--model", &m, "--family", "nope", "--out", &o],
            "unknown task family `nope`",
        ),
        (
            &["--model", &m, "--family", "intent-clinc", "--out", &o],
            "encoders on classification and token-classification families",
        ),
        (
            &["--model", &m, "--family", "ner-wikiann", "--out", &o],
            "a TokenClassification family",
        ),
        (&["--model", &m], "--out is required"),
    ];
    for (args, want) in cases {
        let (code, _, stderr) = prepare(args);
        assert_ne!(code, 0, "{args:?}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    }
    let (code, _, stderr) = common::metapeft(&[
        "adapt",
        "--from",
        &model.join("missing").to_string_lossy(),
        "--task",
        "fortunes/science",
        "--out",
        &o,
    ]);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("prepared.json") && stderr.contains("prepare"),
        "{stderr}"
    );
}

fn text(t: &str, g: &str) -> Example {
    Example {
        content: Content::Text { text: t.into() },
        group: Some(g.into()),
    }
}

fn tiny_family() -> TaskFamily {
    let task = |g: &str, words: &str| FamilyTask {
        name: g.into(),
        group: g.into(),
        examples: (0..12).map(|i| text(&words.repeat(1 + i % 3), g)).collect(),
    };
    TaskFamily {
        name: "tiny".into(),
        kind: TaskKind::LanguageModeling,
        meta_train: vec![task("t1", "a b "), task("t2", "b b a "), task("t3", "a a ")],
        meta_valid: vec![task("v1", "b a a ")],
        meta_test: vec![task("x1", "a b b ")],
    }
}

/// Killed after outer step 2 and resumed, meta-training ends with the same parameters and log as
/// an uninterrupted run.
#[test]
fn meta_training_resumes_exactly() {
    let dir = common::tiny_hf_dir("prep-resume", |_, _| {});
    let ck = model::load(&dir.to_string_lossy(), &Device::Cpu).unwrap();
    let Arch::Llama(cfg) = &ck.arch else {
        unreachable!()
    };
    let llama = Llama::new(cfg.clone(), &Device::Cpu).unwrap();
    let fam = tiny_family();
    let run = |out: &std::path::Path, halt: Option<usize>, resume: bool| {
        let dc = DeltaConfig::Lora(LoraConfig::new(2, 4.0, &["q_proj", "v_proj"]));
        let ad = dc.init(&ck.arch, &ck.params, 1).unwrap();
        let deltas = ad.attach(&ck.arch, &ck.params).unwrap();
        let mm = MetaModel {
            model: Net::Decoder(&llama),
            n_way: 5,
            tok: &ck.tokenizer,
            base: &ck.params,
            deltas: &deltas,
            init: &ad.params,
            lrs: None,
            template: "{prompt}",
            tams: None,
            tag_head: None,
        };
        let mc = MetaConfig {
            algo: Algo::Fomaml,
            meta_steps: 4,
            meta_batch: 2,
            inner_steps: 2,
            support: 4,
            query: 2,
            batch: 2,
            max_len: 12,
            valid_every: 2,
            checkpoint_every: 1,
            outer_lr: 0.05,
            halt_after: halt,
            ..MetaConfig::default()
        };
        let r = meta_train(&mc, &mm, &fam, Some(out), resume);
        (r, ad.params.detached())
    };
    let (full, p_full) = run(&dir.join("full"), None, false);
    let full = full.unwrap();
    let (halted, _) = run(&dir.join("killed"), Some(2), false);
    assert!(halted
        .unwrap_err()
        .to_string()
        .contains("halted after outer step 2"));
    let (resumed, p_res) = run(&dir.join("killed"), None, true);
    let resumed = resumed.unwrap();
    // The crash hit after step 2 but before its checkpoint: step 2 is replayed.
    assert_eq!(resumed.resumed_from, Some(1));
    assert_eq!(resumed.final_query_loss, full.final_query_loss);
    for (n, t) in p_full.iter() {
        let d = (t.tensor() - p_res.get(n).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert_eq!(d, 0.0, "{n}");
    }
    let log = |d: &str| std::fs::read_to_string(dir.join(d).join("meta-metrics.jsonl")).unwrap();
    let strip = |s: String| -> Vec<serde_json::Value> {
        s.lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                v.as_object_mut().unwrap().remove("seconds_per_episode");
                v
            })
            .collect()
    };
    assert_eq!(strip(log("full")), strip(log("killed")));
}
