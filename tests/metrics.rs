//! Metrics against the reference implementations' numbers (`tests/fixtures/metrics.json`, made
//! by `scripts/reference/metrics_fixtures.py` with rouge-score 0.1.2, sacrebleu 2.6.0, seqeval
//! 1.2.2, scikit-learn 1.9.1).

mod common;

use metapeft::eval::{bleu, classification, ood, perplexity::Perplexity, porter, rouge, seqeval};
use serde_json::Value;

fn close(a: f64, b: f64, what: &str) {
    assert!((a - b).abs() < 1e-9, "{what}: {a} vs reference {b}");
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[test]
fn porter_stems_like_nltk() {
    let fx = common::fixture("metrics.json");
    for (w, s) in fx["rouge"]["stems"].as_object().unwrap() {
        assert_eq!(porter::stem(w), s.as_str().unwrap(), "stem of {w}");
    }
}

#[test]
fn rouge_matches_rouge_score() {
    let fx = common::fixture("metrics.json");
    let cases = fx["rouge"]["cases"].as_array().unwrap();
    let mut sums = [0.0; 4];
    for c in cases {
        let (p, r) = (
            c["prediction"].as_str().unwrap(),
            c["reference"].as_str().unwrap(),
        );
        let name = c["name"].as_str().unwrap();
        assert_eq!(
            rouge::tokenize(p),
            strs(&c["prediction_tokens"]),
            "{name}: tokens"
        );
        let s = rouge::rouge(r, p);
        for (k, (key, got)) in [
            ("rouge1", s.rouge1),
            ("rouge2", s.rouge2),
            ("rougeL", s.rouge_l),
            ("rougeLsum", s.rouge_lsum),
        ]
        .into_iter()
        .enumerate()
        {
            for (field, v) in [
                ("precision", got.precision),
                ("recall", got.recall),
                ("fmeasure", got.fmeasure),
            ] {
                close(
                    v,
                    c[key][field].as_f64().unwrap(),
                    &format!("{name} {key} {field}"),
                );
            }
            sums[k] += got.fmeasure;
        }
    }
    for (k, key) in ["rouge1", "rouge2", "rougeL", "rougeLsum"]
        .iter()
        .enumerate()
    {
        close(
            sums[k] / cases.len() as f64,
            fx["rouge"]["corpus_mean_fmeasure"][key].as_f64().unwrap(),
            key,
        );
    }
}

#[test]
fn bleu_matches_sacrebleu() {
    let fx = common::fixture("metrics.json");
    for t in fx["bleu"]["tokenization_13a"].as_array().unwrap() {
        assert_eq!(
            bleu::tokenize_13a(t["input"].as_str().unwrap()),
            t["tok_13a"].as_str().unwrap(),
            "13a of {:?}",
            t["input"]
        );
    }
    for c in fx["bleu"]["corpora"].as_array().unwrap() {
        let hyps = strs(&c["hyps"]);
        let refs: Vec<Vec<String>> = c["refs"].as_array().unwrap().iter().map(strs).collect();
        let b = bleu::corpus_bleu(&hyps, &refs);
        let name = c["name"].as_str().unwrap();
        assert!(
            (b.score - c["score"].as_f64().unwrap()).abs() < 1e-9,
            "{name}: {} vs {}",
            b.score,
            c["score"]
        );
        assert_eq!(
            b.counts.to_vec(),
            c["counts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as usize)
                .collect::<Vec<_>>(),
            "{name}"
        );
        assert_eq!(
            b.totals.to_vec(),
            c["totals"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as usize)
                .collect::<Vec<_>>(),
            "{name}"
        );
        assert_eq!(
            (b.sys_len, b.ref_len),
            (
                c["sys_len"].as_u64().unwrap() as usize,
                c["ref_len"].as_u64().unwrap() as usize
            ),
            "{name}"
        );
        close(b.bp, c["bp"].as_f64().unwrap(), name);
    }
    // corpus_bleu on each single sentence pair (sacreBLEU's sentence_bleu uses effective order;
    // the fixture records the corpus version too).
    for c in fx["bleu"]["sentences"].as_array().unwrap() {
        let hyps = vec![c["hyp"].as_str().unwrap().to_string()];
        let refs: Vec<Vec<String>> = c["refs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| vec![r.as_str().unwrap().to_string()])
            .collect();
        let b = bleu::corpus_bleu(&hyps, &refs);
        assert!(
            (b.score - c["corpus_bleu_same_pair_score"].as_f64().unwrap()).abs() < 1e-9,
            "{}",
            c["name"]
        );
    }
}

#[test]
fn seqeval_matches_seqeval() {
    let fx = common::fixture("metrics.json");
    for scheme in ["iob", "iobes"] {
        let block = &fx["seqeval"][scheme];
        let (mut all_t, mut all_p) = (vec![], vec![]);
        for c in block["cases"].as_array().unwrap() {
            let (t, p) = (strs(&c["y_true"]), strs(&c["y_pred"]));
            let name = c["name"].as_str().unwrap();
            let spans = |v: &[String]| -> Vec<(String, usize, usize)> {
                seqeval::entities(&v.iter().map(String::as_str).collect::<Vec<_>>())
            };
            let want = |k: &str| -> Vec<(String, usize, usize)> {
                c[k].as_array()
                    .unwrap()
                    .iter()
                    .map(|e| {
                        (
                            e[0].as_str().unwrap().to_string(),
                            e[1].as_u64().unwrap() as usize,
                            e[2].as_u64().unwrap() as usize,
                        )
                    })
                    .collect()
            };
            let mut got_t = spans(&t);
            let mut w_t = want("entities_true");
            got_t.sort();
            w_t.sort();
            assert_eq!(got_t, w_t, "{scheme} {name}: spans");
            let s = seqeval::prf(std::slice::from_ref(&p), std::slice::from_ref(&t));
            for (k, v) in [
                ("precision", s.precision),
                ("recall", s.recall),
                ("f1", s.f1),
            ] {
                close(
                    v,
                    c["default"][k].as_f64().unwrap(),
                    &format!("{scheme} {name} {k}"),
                );
            }
            all_t.push(t);
            all_p.push(p);
        }
        let s = seqeval::prf(&all_p, &all_t);
        let corpus = &block["corpus"]["default"];
        for (k, v) in [
            ("precision", s.precision),
            ("recall", s.recall),
            ("f1", s.f1),
        ] {
            close(
                v,
                corpus[k].as_f64().unwrap(),
                &format!("{scheme} corpus {k}"),
            );
        }
        close(
            seqeval::token_accuracy(&all_p, &all_t),
            block["corpus"]["accuracy"].as_f64().unwrap(),
            "accuracy",
        );
    }
}

#[test]
fn ood_metrics_match_sklearn() {
    let fx = common::fixture("metrics.json");
    for s in fx["ood"]["score_sets"].as_array().unwrap() {
        let (id, oo) = (f64s(&s["id_scores"]), f64s(&s["ood_scores"]));
        let name = s["name"].as_str().unwrap();
        assert!(
            (ood::auroc(&id, &oo) - s["auroc"].as_f64().unwrap()).abs() < 1e-9,
            "{name} auroc"
        );
        assert!(
            (ood::aupr(&id, &oo) - s["aupr_in"].as_f64().unwrap()).abs() < 1e-9,
            "{name} aupr"
        );
        assert!(
            (ood::fpr_at_95_tpr(&id, &oo) - s["fpr95"].as_f64().unwrap()).abs() < 1e-12,
            "{name} fpr95"
        );
    }
    for row in fx["ood"]["logits_scores"].as_array().unwrap() {
        let logits = vec![f64s(&row["logits"])
            .into_iter()
            .map(|x| x as f32)
            .collect::<Vec<f32>>()];
        let (m, e1, e2) = (
            ood::msp(&logits)[0],
            ood::neg_energy(&logits, 1.0)[0],
            ood::neg_energy(&logits, 2.0)[0],
        );
        assert!(
            (m - row["msp"].as_f64().unwrap()).abs() < 1e-6,
            "msp {m} vs {}",
            row["msp"]
        );
        for (got, key) in [(e1, "energy_score_T1"), (e2, "energy_score_T2")] {
            let want = row[key].as_f64().unwrap();
            assert!(
                (got - want).abs() < 1e-4 * want.abs().max(1.0),
                "{key} {got} vs {want}"
            );
        }
    }
}

#[test]
fn classification_and_perplexity_match() {
    let fx = common::fixture("metrics.json");
    for s in fx["classification"]["sets"].as_array().unwrap() {
        let t: Vec<String> = s["y_true"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.to_string())
            .collect();
        let p: Vec<String> = s["y_pred"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.to_string())
            .collect();
        close(
            classification::accuracy(&p, &t),
            s["accuracy"].as_f64().unwrap(),
            "accuracy",
        );
        close(
            classification::macro_f1(&p, &t),
            s["f1_macro"].as_f64().unwrap(),
            s["name"].as_str().unwrap(),
        );
    }
    let px = &fx["perplexity"];
    let mut ppl = Perplexity::default();
    for (lps, n) in px["sequences_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .zip(px["lengths"].as_array().unwrap())
    {
        ppl.add(f64s(lps).iter().sum(), n.as_u64().unwrap() as usize);
    }
    close(
        ppl.value(),
        px["perplexity"].as_f64().unwrap(),
        "perplexity",
    );
}
