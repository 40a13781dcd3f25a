//! Learning-rate schedules, as a multiplier of the peak rate for step `t` of `total`.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Schedule {
    Constant,
    /// Linear warm-up over `warmup` steps, then linear decay to 0 at the last step.
    Linear {
        warmup: usize,
    },
    /// Linear warm-up, then half a cosine down to 0.
    Cosine {
        warmup: usize,
    },
}

impl Schedule {
    pub fn factor(&self, t: usize, total: usize) -> f64 {
        let warm = |w: usize| {
            if w > 0 && t < w {
                Some((t + 1) as f64 / w as f64)
            } else {
                None
            }
        };
        match *self {
            Schedule::Constant => 1.0,
            Schedule::Linear { warmup } => warm(warmup).unwrap_or_else(|| {
                let rest = total.saturating_sub(warmup).max(1) as f64;
                (1.0 - (t - warmup) as f64 / rest).max(0.0)
            }),
            Schedule::Cosine { warmup } => warm(warmup).unwrap_or_else(|| {
                let rest = total.saturating_sub(warmup).max(1) as f64;
                let p = ((t - warmup) as f64 / rest).min(1.0);
                0.5 * (1.0 + (std::f64::consts::PI * p).cos())
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        let l = Schedule::Linear { warmup: 10 };
        assert_eq!(l.factor(0, 110), 0.1);
        assert_eq!(l.factor(9, 110), 1.0);
        assert_eq!(l.factor(10, 110), 1.0);
        assert!((l.factor(60, 110) - 0.5).abs() < 1e-12);
        let c = Schedule::Cosine { warmup: 0 };
        assert_eq!(c.factor(0, 100), 1.0);
        assert!((c.factor(50, 100) - 0.5).abs() < 1e-12);
        assert!(c.factor(100, 100).abs() < 1e-12);
        assert_eq!(Schedule::Constant.factor(7, 10), 1.0);
    }
}
