//! `metapeft adapt` end to end on small settings: report, adapter, log, resume, bad input.

mod common;

fn adapt(args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["adapt"];
    all.extend_from_slice(args);
    common::metapeft(&all)
}

/// Whitespace-separated fixed arguments, then arguments that may contain spaces (paths).
fn argv<'a>(line: &'a str, paths: &[&'a str]) -> Vec<&'a str> {
    line.split_whitespace()
        .chain(paths.iter().copied())
        .collect()
}

fn adapt_line(line: &str, paths: &[&str]) -> (i32, String, String) {
    adapt(&argv(line, paths))
}

fn eval_line(line: &str, paths: &[&str]) -> (i32, serde_json::Value, String) {
    eval(&argv(line, paths))
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
    // eval with the saved adapter gives the run's final perplexity; without it, the "before".
    let adapter = out.join("adapter").display().to_string();
    let common_args = [
        "--task",
        "fortunes/science",
        "--max-len",
        "32",
        "--eval-limit",
        "6",
    ];
    let mut with = vec!["--adapter", adapter.as_str()];
    with.extend_from_slice(&common_args);
    let (code, j, err) = eval(&with);
    assert_eq!(code, 0, "{err}");
    assert_eq!(j["result"]["metric"], "perplexity");
    close(
        &j["result"]["value"],
        &rep["result"]["after"],
        "perplexity after",
    );
    let (code, j, err) = eval(&common_args);
    assert_eq!(code, 0, "{err}");
    close(
        &j["result"]["value"],
        &rep["result"]["before"],
        "perplexity before",
    );
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

/// The training loss of every step in a run's `metrics.jsonl`.
fn losses(dir: &std::path::Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

fn report(dir: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap()
}

fn eval(args: &[&str]) -> (i32, serde_json::Value, String) {
    let mut all = vec!["eval"];
    all.extend_from_slice(args);
    let (code, out, err) = common::metapeft(&all);
    (code, serde_json::from_str(&out).unwrap_or_default(), err)
}

fn close(a: &serde_json::Value, b: &serde_json::Value, what: &str) {
    let (x, y) = (a.as_f64().unwrap(), b.as_f64().unwrap());
    assert!((x - y).abs() <= 1e-6, "{what}: {x} vs {y}");
}

fn minilm() -> String {
    common::minilm_path().display().to_string()
}

#[test]
fn eval_reproduces_adapt_and_rejects_a_head_for_other_labels() {
    let out = common::temp_dir("adapt-eval").join("run");
    let (m, o) = (minilm(), out.display().to_string());
    let (code, _, err) = adapt_line(
        "--task clinc150/banking --method lora --shots 2 --steps 3 --eval-limit 30",
        &["--model", &m, "--out", &o],
    );
    assert_eq!(code, 0, "{err}");
    let rep = report(&out);
    // The curves are drawn at the end of the run.
    let svg = std::fs::read_to_string(out.join("loss.svg")).unwrap();
    assert!(svg.contains("<svg") && (svg.contains("<polyline") || svg.contains("<path")));
    let head = std::fs::read_to_string(out.join("head.json")).unwrap();
    assert!(head.contains("encoder_mean_pooled_linear"), "{head}");
    // eval with the saved adapter and head gives adapt's "after" numbers.
    let adapter = out.join("adapter").display().to_string();
    let (code, j, err) = eval_line(
        "--task clinc150/banking --eval-limit 30",
        &["--model", &m, "--adapter", &adapter, "--head", &o],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(j["result"]["metric"], "accuracy");
    for k in ["accuracy", "macro_f1"] {
        close(
            &j["result"]["metrics"][k],
            &rep["result"]["metrics_after"][k],
            k,
        );
    }
    // A head trained on another domain: the error names labels on both sides.
    let (code, _, err) = eval_line(
        "--task clinc150/travel --eval-limit 5",
        &["--model", &m, "--head", &o],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("labels.json")
            && err.contains("missing from the head")
            && err.contains("book_flight")
            && err.contains("not in the task")
            && err.contains("freeze_account"),
        "{err}"
    );
    // An encoder on classification without a head says what it needs.
    let (code, _, err) = eval_line("--task clinc150/banking --eval-limit 5", &["--model", &m]);
    assert_eq!(code, 1);
    assert!(err.contains("--head DIR"), "{err}");
}

#[test]
fn early_stopping_stops_when_the_metric_stalls() {
    let out = common::temp_dir("adapt-early").join("run");
    let (m, o) = (minilm(), out.display().to_string());
    // lr 0: the metric never improves after the first evaluation; patience 2 stops at step 3.
    let (code, _, err) = adapt_line(
        "--task clinc150/banking --method lora --shots 1 --steps 20 --lr 0 --eval-every 1 \
         --patience 2 --metric macro_f1 --eval-limit 15",
        &["--model", &m, "--out", &o],
    );
    assert_eq!(code, 0, "{err}");
    let t = &report(&out)["result"]["train"];
    assert_eq!(t["stopped_early"], true, "{t}");
    assert_eq!(t["steps"], 3);
    assert_eq!(t["best_step"], 1);
    assert!(out.join("eval.svg").is_file());
    // --metric picks what is logged and watched: macro-F1 here.
    let rep = report(&out);
    assert_eq!(rep["result"]["eval_metric"], "macro_f1");
    let first: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    close(
        &first["eval_metric"],
        &rep["result"]["metrics_before"]["macro_f1"],
        "logged macro-F1",
    );
    assert_ne!(
        rep["result"]["metrics_before"]["macro_f1"],
        rep["result"]["metrics_before"]["accuracy"]
    );
    let (code, _, err) = adapt_line(
        "--task clinc150/banking --steps 1 --eval-limit 5 --metric bleu",
        &["--model", &m, "--out", &o],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("bleu") && err.contains("accuracy, macro_f1"),
        "{err}"
    );
    // --restore-best: a learning rate that makes things worse ends with the best evaluation's
    // parameters, so "after" is the best logged metric, not the last.
    let best = common::temp_dir("adapt-best").join("run");
    let (code, _, err) = adapt_line(
        "--task clinc150/banking --method lora --shots 2 --steps 16 --lr 3e-2 \
         --eval-every 2 --patience 2 --restore-best true --eval-limit 30",
        &["--model", &m, "--out", best.to_str().unwrap()],
    );
    assert_eq!(code, 0, "{err}");
    let rep = report(&best);
    let t = &rep["result"]["train"];
    assert_eq!(t["restored_best"], true, "{t}");
    close(&rep["result"]["after"], &t["best_metric"], "after vs best");
    let last: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(best.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    assert!(last["eval_metric"].as_f64().unwrap() < t["best_metric"].as_f64().unwrap());
    // --patience alone is refused.
    let (code, _, err) = adapt_line(
        "--task clinc150/banking --patience 2",
        &["--model", &m, "--out", &o],
    );
    assert_eq!(code, 1);
    assert!(err.contains("--eval-every"), "{err}");
}

#[test]
fn sigkill_mid_run_then_resume_ends_like_an_uninterrupted_run() {
    let dir = common::temp_dir("adapt-kill");
    let m = minilm();
    let args = |out: &std::path::Path| -> Vec<String> {
        [
            "adapt",
            "--model",
            &m,
            "--task",
            "clinc150/banking",
            "--method",
            "lora",
            "--shots",
            "4",
            "--steps",
            "40",
            "--batch-size",
            "8",
            "--max-len",
            "24",
            "--lr",
            "3e-3",
            "--eval-limit",
            "30",
            "--checkpoint-every",
            "2",
            "--out",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let whole = dir.join("whole");
    let a: Vec<String> = args(&whole);
    let (code, _, err) = common::metapeft(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 0, "{err}");

    let killed = dir.join("killed");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_metapeft"))
        .args(args(&killed))
        .env("METAPEFT_NO_PROGRESS", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while !killed.join("checkpoint/state.json").is_file() {
        assert!(t0.elapsed().as_secs() < 120, "no checkpoint appeared");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before its first checkpoint"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL on Unix
    child.wait().unwrap();
    assert!(
        !killed.join("report.json").exists(),
        "the run finished before the kill"
    );
    let mut r: Vec<String> = args(&killed);
    r.push("--resume".into());
    let (code, _, err) = common::metapeft(&r.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 0, "{err}");
    let (w, k) = (report(&whole), report(&killed));
    let from = k["result"]["train"]["resumed_from"]
        .as_u64()
        .expect("resumed");
    assert!(from > 0 && from < 40, "resumed from {from}");
    for key in ["accuracy", "macro_f1"] {
        close(
            &k["result"]["metrics_after"][key],
            &w["result"]["metrics_after"][key],
            key,
        );
    }
    close(
        &k["result"]["train"]["final_loss"],
        &w["result"]["train"]["final_loss"],
        "final loss",
    );
    // The whole loss curve is the same, step by step.
    let (lw, lk) = (losses(&whole), losses(&killed));
    assert_eq!(lw.len(), 40);
    assert_eq!(lk.len(), 40);
    for (s, (a, b)) in lw.iter().zip(&lk).enumerate() {
        assert!((a - b).abs() <= 1e-6, "step {}: {a} vs {b}", s + 1);
    }
}

#[test]
fn full_fine_tuning_changes_the_metric_and_writes_the_model() {
    let out = common::temp_dir("adapt-full").join("run");
    let (m, o) = (minilm(), out.display().to_string());
    let (code, _, err) = adapt_line(
        "--task clinc150/banking --method full --shots 2 --steps 4 --lr 1e-3 --eval-limit 30",
        &["--model", &m, "--out", &o],
    );
    assert_eq!(code, 0, "{err}");
    let rep = report(&out);
    assert_ne!(
        rep["result"]["metrics_before"],
        rep["result"]["metrics_after"]
    );
    assert!(out.join("model/config.json").is_file() && !out.join("adapter").exists());
    // The written model with the saved head gives the run's final numbers.
    let model = out.join("model").display().to_string();
    let (code, j, err) = eval_line(
        "--task clinc150/banking --eval-limit 30",
        &["--model", &model, "--head", &o],
    );
    assert_eq!(code, 0, "{err}");
    close(&j["result"]["value"], &rep["result"]["after"], "accuracy");
    close(
        &j["result"]["metrics"]["macro_f1"],
        &rep["result"]["metrics_after"]["macro_f1"],
        "macro-F1",
    );
}

#[test]
fn linear_probe_trains_only_the_head() {
    let out = common::temp_dir("adapt-probe").join("run");
    let (m, o) = (minilm(), out.display().to_string());
    let (code, _, err) = adapt_line(
        "--task clinc150/banking --method head --shots 4 --steps 30 --batch-size 16 --lr \
         2e-2 --eval-limit 60",
        &["--model", &m, "--out", &o],
    );
    assert_eq!(code, 0, "{err}");
    let rep = report(&out);
    let (b, a) = (
        rep["result"]["before"].as_f64().unwrap(),
        rep["result"]["after"].as_f64().unwrap(),
    );
    assert!(a > b + 0.2, "probe accuracy {b} -> {a}");
    assert!(out.join("head.safetensors").is_file());
    assert!(!out.join("adapter").exists() && !out.join("model").exists());
    // Nothing to probe on a language-modelling task.
    let (code, _, err) = adapt_line("--task fortunes/science --method head", &["--out", &o]);
    assert_eq!(code, 1);
    assert!(err.contains("classification head only"), "{err}");
}

#[test]
fn token_classification_on_wikiann() {
    let out = common::temp_dir("adapt-ner").join("run");
    let (m, o) = (minilm(), out.display().to_string());
    let (code, _, err) = adapt_line(
        "--task wikiann/en --method lora --shots 32 --steps 8 --batch-size 8 --lr 1e-2 \
         --max-len 48 --eval-limit 40",
        &["--model", &m, "--out", &o],
    );
    assert_eq!(code, 0, "{err}");
    let rep = report(&out);
    assert_eq!(rep["result"]["metric"], "f1");
    assert_eq!(rep["result"]["labels"], 7, "O plus B-/I- of PER, ORG, LOC");
    let after = &rep["result"]["metrics_after"];
    for k in ["f1", "precision", "recall", "token_accuracy"] {
        let v = after[k].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&v), "{k} {v}");
    }
    assert!(
        after["token_accuracy"].as_f64().unwrap()
            > rep["result"]["metrics_before"]["token_accuracy"]
                .as_f64()
                .unwrap()
    );
    let adapter = out.join("adapter").display().to_string();
    let (code, j, err) = eval_line(
        "--task wikiann/en --max-len 48 --eval-limit 40",
        &["--model", &m, "--adapter", &adapter, "--head", &o],
    );
    assert_eq!(code, 0, "{err}");
    close(&j["result"]["value"], &after["f1"], "entity F1");
}

#[test]
fn decoder_classification_with_verbalizers_and_a_last_token_head() {
    let out = common::temp_dir("adapt-dec-cls").join("run");
    let o = out.display().to_string();
    let (code, _, err) = adapt_line(
        "--task sst2 --method lora --head linear --shots 2 --steps 2 --batch-size 4 \
         --max-len 48 --eval-limit 8",
        &["--out", &o],
    );
    assert_eq!(code, 0, "{err}");
    let rep = report(&out);
    assert_eq!(rep["result"]["head"], "linear");
    assert_eq!(rep["result"]["labels"], 2);
    assert!(std::fs::read_to_string(out.join("head.json"))
        .unwrap()
        .contains("decoder_last_token_linear"));
    let adapter = out.join("adapter").display().to_string();
    let (code, j, err) = eval_line(
        "--task sst2 --max-len 48 --eval-limit 8",
        &["--adapter", &adapter, "--head", &o],
    );
    assert_eq!(code, 0, "{err}");
    close(&j["result"]["value"], &rep["result"]["after"], "accuracy");
    // Without a head a decoder is scored zero-shot by its verbalizers.
    let (code, j, err) = eval_line(
        "--task sst2 --max-len 48 --eval-limit 8 --verbalizers 0=bad,1=good",
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(j["result"]["head"], "verbalizer");
    assert_eq!(
        j["result"]["verbalizers"],
        serde_json::json!([" bad", " good"])
    );
    // Verbalizers must name known labels and tell the labels apart.
    let (code, _, err) = eval_line("--task sst2 --eval-limit 2 --verbalizers 2=meh", &[]);
    assert_eq!(code, 1);
    assert!(err.contains("`2`") && err.contains("0, 1"), "{err}");
    let (code, _, err) = eval_line("--task sst2 --eval-limit 2 --verbalizers 0=ok,1=ok", &[]);
    assert_eq!(code, 1);
    assert!(err.contains("same verbalizer"), "{err}");
    // A head on a task without labels is a mistake, not ignored.
    let (code, _, err) = eval_line("--task fortunes/science --eval-limit 2", &["--head", &o]);
    assert_eq!(code, 1);
    assert!(err.contains("classification tasks"), "{err}");
    // A bad --head value is an error.
    let (code, _, err) = adapt_line(
        "--task sst2 --head pooled --steps 1 --eval-limit 2",
        &["--out", &o],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("linear") && err.contains("verbalizer"),
        "{err}"
    );
}

#[test]
fn half_and_quantized_bases_train_and_score_like_f32() {
    let dir = common::temp_dir("adapt-bf16");
    let line = "--task fortunes/science --method lora --shots 4 --steps 1 --batch-size 2 \
                --max-len 32 --eval-limit 4";
    let mut before = vec![];
    for dt in ["f32", "bf16", "gguf", "q8_0"] {
        let out = dir.join(dt);
        let (code, _, err) =
            adapt_line(line, &["--base-dtype", dt, "--out", out.to_str().unwrap()]);
        assert_eq!(code, 0, "{err}");
        before.push(report(&out)["result"]["before"].as_f64().unwrap());
    }
    // bf16 keeps 8 bits of mantissa and Q8_0 8-bit blocks: the perplexity moves a little. The
    // GGUF's own blocks are the very weights f32 was dequantized from: the same perplexity, up to
    // summation order (the f32 path fuses the LM head into the loss).
    let rel = |i: usize| (before[i] - before[0]).abs() / before[0];
    assert!(
        rel(1) < 0.03,
        "perplexity f32 {} vs bf16 {}",
        before[0],
        before[1]
    );
    assert!(
        rel(2) < 1e-3,
        "perplexity f32 {} vs gguf {}",
        before[0],
        before[2]
    );
    assert!(
        rel(3) < 0.03,
        "perplexity f32 {} vs q8_0 {}",
        before[0],
        before[3]
    );
    let o = dir.join("bad").display().to_string();
    let (code, _, err) = adapt_line("--task fortunes/science --base-dtype fp8", &["--out", &o]);
    assert_eq!(code, 1);
    assert!(err.contains("expected f32, bf16, f16, gguf"), "{err}");
    let (code, _, err) = adapt_line(
        "--task fortunes/science --base-dtype packed",
        &["--out", &o],
    );
    assert_eq!(code, 1);
    assert!(err.contains("inference layout"), "{err}");
    let (code, _, err) = adapt_line(
        "--task fortunes/science --method full --base-dtype bf16",
        &["--out", &o],
    );
    assert_eq!(code, 1);
    assert!(err.contains("--method full"), "{err}");
}

#[test]
fn activation_checkpointing_trains_like_the_plain_graph() {
    let dir = common::temp_dir("adapt-ckpt");
    let line = "--task fortunes/science --method lora --shots 4 --steps 3 --batch-size 2 \
                --max-len 32 --eval-limit 4 --lr 3e-3";
    let mut runs = vec![];
    for on in ["false", "true"] {
        let out = dir.join(on);
        let (code, _, err) = adapt_line(
            line,
            &[
                "--activation-checkpointing",
                on,
                "--out",
                out.to_str().unwrap(),
            ],
        );
        assert_eq!(code, 0, "{err}");
        runs.push((
            losses(&out),
            report(&out)["result"]["after"].as_f64().unwrap(),
        ));
    }
    let ((plain, a), (ckpt, b)) = (&runs[0], &runs[1]);
    assert_eq!(plain.len(), 3);
    // The same computation, re-run: equal up to rounding. Step 3's loss depends on the
    // gradients of steps 1 and 2, so it checks them too.
    for (x, y) in plain.iter().zip(ckpt) {
        assert!((x - y).abs() < 1e-4 * x.abs(), "loss {x} vs {y}");
    }
    assert!((a - b).abs() < 1e-4 * a, "perplexity after {a} vs {b}");
    assert!(plain[0] != plain[2], "training changed nothing: {plain:?}");
}
