//! `metapeft adapt` end to end on small settings: report, adapter, log, resume, bad input.

mod common;

fn adapt(args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["adapt"];
    all.extend_from_slice(args);
    common::metapeft(&all)
}

#[test]
fn decoder_lm_run_writes_report_adapter_and_log() {
    let dir = common::temp_dir("adapt-lm");
    let out = dir.join("run");
    let args = [
        "--task",
        "fortunes/science",
        "--method",
        "lora",
        "--shots",
        "8",
        "--steps",
        "4",
        "--batch-size",
        "2",
        "--max-len",
        "32",
        "--eval-limit",
        "6",
        "--lr",
        "3e-3",
        "--out",
        out.to_str().unwrap(),
    ];
    let (code, stdout, err) = adapt(&args);
    assert_eq!(code, 0, "{err}");
    let rep: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(rep["result"]["metric"], "perplexity");
    let (b, a) = (
        rep["result"]["before"].as_f64().unwrap(),
        rep["result"]["after"].as_f64().unwrap(),
    );
    assert!(b.is_finite() && a.is_finite() && a > 1.0, "{stdout}");
    assert!(out.join("adapter/metapeft_adapter.json").is_file());
    assert_eq!(
        std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count(),
        4
    );
    // Resuming a finished run trains nothing more and reports the same numbers.
    let mut resume = args.to_vec();
    resume.push("--resume");
    let (code, _, err) = adapt(&resume);
    assert_eq!(code, 0, "{err}");
    let rep2: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(rep2["result"]["after"], rep["result"]["after"]);
    assert_eq!(rep2["result"]["train"]["resumed_from"], 4);
}

#[test]
fn encoder_classification_run_and_toml_config() {
    let dir = common::temp_dir("adapt-cls");
    let out = dir.join("run");
    let cfg = dir.join("run.toml");
    std::fs::write(
        &cfg,
        format!(
            "model = \"{}\"\ntask = \"clinc150/banking\"\nmethod = \"lora\"\nshots = 2\nsteps = 3\nbatch_size = 8\neval_limit = 30\nout = \"{}\"\n",
            common::minilm_path().display(),
            out.display()
        ),
    )
    .unwrap();
    let (code, _, err) = adapt(&["--config", cfg.to_str().unwrap(), "--steps", "2"]);
    assert_eq!(code, 0, "{err}");
    let rep: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(rep["steps"], 2, "the command line overrides the file");
    assert_eq!(rep["result"]["labels"], 15);
    assert!(out.join("head.safetensors").is_file() && out.join("labels.json").is_file());
    // Unknown keys in the file are an error, not silently ignored.
    std::fs::write(&cfg, "taks = \"clinc150\"\n").unwrap();
    let (code, _, err) = adapt(&["--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("run.toml") && err.contains("taks"), "{err}");
    // Unsupported combinations say so.
    let (code, _, err) = adapt(&["--task", "wikiann/en", "--out", out.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("not supported"), "{err}");
}
