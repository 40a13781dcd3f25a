//! Loss and evaluation curves from a run's `metrics.jsonl`, drawn as SVG with `plotters`.

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::{Error, Result};

/// `(step, value)` points.
pub type Series = Vec<(f64, f64)>;

/// Series read from a metrics log: `(step, loss)` and `(step, eval_metric)`.
pub fn read_log(log: &Path) -> Result<(Series, Series)> {
    let text = std::fs::read_to_string(log).map_err(|e| Error::file(log, e))?;
    let (mut loss, mut eval) = (vec![], vec![]);
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| Error::file(log, format!("line {}: {e}", i + 1)))?;
        let Some(step) = v.get("step").and_then(|s| s.as_f64()) else {
            continue;
        };
        if let Some(l) = v.get("loss").and_then(|l| l.as_f64()) {
            loss.push((step, l));
        }
        if let Some(m) = v.get("eval_metric").and_then(|m| m.as_f64()) {
            eval.push((step, m));
        }
    }
    Ok((loss, eval))
}

/// Draw one line chart of `points` to `path`.
pub fn line_chart(path: &Path, title: &str, y_label: &str, points: &[(f64, f64)]) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| Error::file(path, format!("plot: {e}"));
    let finite: Vec<(f64, f64)> = points
        .iter()
        .copied()
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    if finite.is_empty() {
        return Err(Error::invalid(format!("{title}: nothing to plot")));
    }
    let (x0, x1) = finite
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
            (a.min(p.0), b.max(p.0))
        });
    let (y0, y1) = finite
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
            (a.min(p.1), b.max(p.1))
        });
    let pad = ((y1 - y0) * 0.05).max(1e-6);
    let root = SVGBackend::new(path, (720, 440)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(x0..x1.max(x0 + 1.0), (y0 - pad)..(y1 + pad))
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc(y_label)
        .draw()
        .map_err(|e| err(&e))?;
    chart
        .draw_series(LineSeries::new(finite, &BLUE))
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// Render `loss.svg` (and `eval.svg` when the log has evaluations, titled with `metric`) into
/// `dir`. Returns the files written.
pub fn plot_run(log: &Path, dir: &Path, metric: &str) -> Result<Vec<PathBuf>> {
    let (loss, eval) = read_log(log)?;
    let mut out = vec![];
    if !loss.is_empty() {
        let p = dir.join("loss.svg");
        line_chart(&p, "training loss", "loss", &loss)?;
        out.push(p);
    }
    if !eval.is_empty() {
        let p = dir.join("eval.svg");
        line_chart(&p, &format!("evaluation: {metric}"), metric, &eval)?;
        out.push(p);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svg_curves_are_written_from_a_log() {
        let dir = std::env::temp_dir().join(format!("metapeft-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("metrics.jsonl");
        let mut text = String::new();
        for s in 1..=6 {
            let mut rec = serde_json::json!({"step": s, "loss": 2.0 / s as f64, "lr": 1e-3});
            if s % 2 == 0 {
                rec["eval_metric"] = (0.1 * s as f64).into();
            }
            text.push_str(&format!("{rec}\n"));
        }
        std::fs::write(&log, text).unwrap();
        let files = plot_run(&log, &dir, "accuracy").unwrap();
        assert_eq!(files, vec![dir.join("loss.svg"), dir.join("eval.svg")]);
        for f in &files {
            let svg = std::fs::read_to_string(f).unwrap();
            assert!(svg.starts_with("<svg") || svg.contains("<svg"), "{svg}");
            assert!(
                svg.contains("<polyline") || svg.contains("<path"),
                "no line in {}",
                f.display()
            );
        }
        assert!(std::fs::read_to_string(&files[1])
            .unwrap()
            .contains("accuracy"));
        // A log without evaluations gives only the loss curve; an unreadable line is an error.
        std::fs::write(
            &log,
            "{\"step\":1,\"loss\":1.0}\n{\"step\":2,\"loss\":0.5}\n",
        )
        .unwrap();
        let _ = std::fs::remove_file(dir.join("eval.svg"));
        assert_eq!(plot_run(&log, &dir, "f1").unwrap().len(), 1);
        std::fs::write(&log, "{\"step\":1,\n").unwrap();
        assert!(plot_run(&log, &dir, "f1")
            .unwrap_err()
            .to_string()
            .contains("line 1"));
    }
}
