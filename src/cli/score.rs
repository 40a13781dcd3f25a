use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use metapeft::eval::{bleu, classification, ood, rouge, seqeval};

#[derive(clap::Args)]
#[command(
    after_help = "Files hold one example per line: text for rouge/bleu, a label for accuracy/f1, a \
space-separated tag sequence for seqeval, a score (predictions) and 1 = in-distribution / 0 = OOD \
(references) for auroc. In ROUGE inputs the two characters \\n mark a sentence break (ROUGE-Lsum).\n\n\
Examples:\n  metapeft score --metric rouge --predictions pred.txt --references ref.txt\n  \
metapeft score --metric bleu --predictions hyp.txt --references ref1.txt --references ref2.txt --json"
)]
pub struct Args {
    #[arg(long, value_enum)]
    metric: Metric,
    #[arg(long)]
    predictions: PathBuf,
    /// Reference file (repeat for several BLEU reference streams)
    #[arg(long, required = true)]
    references: Vec<PathBuf>,
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Metric {
    /// ROUGE-1/2/L/Lsum F1 (rouge-score, Porter stemming), mean over examples
    Rouge,
    /// Corpus BLEU (sacreBLEU defaults)
    Bleu,
    /// Entity-level precision/recall/F1 (seqeval default mode) and token accuracy
    Seqeval,
    Accuracy,
    /// Macro-F1 over labels
    F1,
    /// AUROC, AUPR and FPR at 95% TPR for OOD detection
    Auroc,
}

fn lines(p: &Path) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(p).with_context(|| format!("{}: cannot read", p.display()))?;
    Ok(text.lines().map(str::to_string).collect())
}

pub fn run(a: Args) -> Result<()> {
    let pred = lines(&a.predictions)?;
    let refs: Vec<Vec<String>> = a
        .references
        .iter()
        .map(|p| lines(p))
        .collect::<Result<_>>()?;
    for (p, r) in a.references.iter().zip(&refs) {
        if r.len() != pred.len() {
            bail!(
                "{} has {} lines but {} has {}: one example per line in both",
                a.predictions.display(),
                pred.len(),
                p.display(),
                r.len()
            );
        }
    }
    let gold = &refs[0];
    let out: serde_json::Value = match a.metric {
        Metric::Rouge => {
            let n = pred.len().max(1) as f64;
            let mut sum = [[0.0f64; 3]; 4];
            for (p, r) in pred.iter().zip(gold) {
                let s = rouge::rouge(&r.replace("\\n", "\n"), &p.replace("\\n", "\n"));
                for (k, x) in [s.rouge1, s.rouge2, s.rouge_l, s.rouge_lsum]
                    .iter()
                    .enumerate()
                {
                    sum[k][0] += x.precision;
                    sum[k][1] += x.recall;
                    sum[k][2] += x.fmeasure;
                }
            }
            let mut o = serde_json::Map::new();
            for (k, name) in ["rouge1", "rouge2", "rougeL", "rougeLsum"]
                .iter()
                .enumerate()
            {
                o.insert(
                    name.to_string(),
                    serde_json::json!({"precision": sum[k][0] / n, "recall": sum[k][1] / n, "fmeasure": sum[k][2] / n}),
                );
            }
            serde_json::Value::Object(o)
        }
        Metric::Bleu => serde_json::to_value(bleu::corpus_bleu(&pred, &refs))?,
        Metric::Seqeval => {
            let split = |v: &[String]| -> Vec<Vec<String>> {
                v.iter()
                    .map(|l| l.split_whitespace().map(String::from).collect())
                    .collect()
            };
            let (p, g) = (split(&pred), split(gold));
            for (i, (x, y)) in p.iter().zip(&g).enumerate() {
                if x.len() != y.len() {
                    bail!(
                        "line {}: {} tags in {} but {} in {}",
                        i + 1,
                        x.len(),
                        a.predictions.display(),
                        y.len(),
                        a.references[0].display()
                    );
                }
            }
            let s = seqeval::prf(&p, &g);
            serde_json::json!({"precision": s.precision, "recall": s.recall, "f1": s.f1, "accuracy": seqeval::token_accuracy(&p, &g)})
        }
        Metric::Accuracy => serde_json::json!({"accuracy": classification::accuracy(&pred, gold)}),
        Metric::F1 => serde_json::json!({"macro_f1": classification::macro_f1(&pred, gold)}),
        Metric::Auroc => {
            let (mut id, mut oo) = (vec![], vec![]);
            for (i, (s, l)) in pred.iter().zip(gold).enumerate() {
                let s: f64 = s.trim().parse().with_context(|| {
                    format!("{}:{}: not a number: {s:?}", a.predictions.display(), i + 1)
                })?;
                match l.trim() {
                    "1" => id.push(s),
                    "0" => oo.push(s),
                    other => bail!(
                        "{}:{}: label must be 1 (in-distribution) or 0 (OOD), got {other:?}",
                        a.references[0].display(),
                        i + 1
                    ),
                }
            }
            if id.is_empty() || oo.is_empty() {
                bail!("auroc needs both in-distribution (1) and OOD (0) examples");
            }
            serde_json::json!({"auroc": ood::auroc(&id, &oo), "aupr": ood::aupr(&id, &oo), "fpr_at_95_tpr": ood::fpr_at_95_tpr(&id, &oo)})
        }
    };
    if a.json {
        println!("{out}");
    } else if let serde_json::Value::Object(o) = &out {
        for (k, v) in o {
            println!("{k:<14} {v}");
        }
    }
    Ok(())
}
