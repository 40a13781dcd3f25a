//! Row reductions (maximum, sums) in eight independent lanes.
//!
//! Floating-point addition is not associative, so the compiler keeps a `fold` or `sum` in
//! order: each add waits for the one before (3-4 cycles an element). Eight partial results make
//! the adds independent, and the compiler puts them in vector registers. Written as plain folds,
//! the norms' and softmaxes' row reductions were ~3% of a LoRA step's samples (`perf`), several
//! times their element-wise work.

use candle_core::WithDType;
use num_traits::Float;

const LANES: usize = 8;

fn larger<T: Float>(a: T, b: T) -> T {
    // `if`, not `Float::max`: this form is the vector max instruction.
    if b > a {
        b
    } else {
        a
    }
}

/// The largest element of `xs` (`-inf` when empty). NaNs may be passed over: the callers go on
/// to compute from the row itself, where a NaN propagates.
pub(crate) fn max<T: Float>(xs: &[T]) -> T {
    let mut m = [T::neg_infinity(); LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            m[l] = larger(m[l], c[l]);
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .fold(T::neg_infinity(), |a, &v| larger(a, v));
    m.into_iter().fold(tail, larger)
}

/// `sum a_i b_i` in `T`, over the shorter of the two.
pub(crate) fn dot<T: Float>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::zero(); LANES];
    let (mut ca, mut cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..LANES {
            acc[l] = acc[l] + x[l] * y[l];
        }
    }
    let tail = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .fold(T::zero(), |s, (&x, &y)| s + x * y);
    acc.into_iter().fold(tail, |s, v| s + v)
}

/// `sum f(x_i)` over `xs`, each term in f64.
pub(crate) fn sum_by<T: WithDType>(xs: &[T], f: impl Fn(f64) -> f64) -> f64 {
    let mut acc = [0f64; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            acc[l] += f(c[l].to_f64());
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|&v| f(v.to_f64())).sum();
    acc.iter().sum::<f64>() + tail
}

/// `sum f(a_i, b_i, c_i)` over three slices of one length, each term in f64.
pub(crate) fn sum3_by<T: WithDType>(
    a: &[T],
    b: &[T],
    c: &[T],
    f: impl Fn(f64, f64, f64) -> f64,
) -> f64 {
    assert!(
        a.len() == b.len() && b.len() == c.len(),
        "sum3_by: lengths {}, {}, {}",
        a.len(),
        b.len(),
        c.len()
    );
    let mut acc = [0f64; LANES];
    let (mut ca, mut cb, mut cc) = (
        a.chunks_exact(LANES),
        b.chunks_exact(LANES),
        c.chunks_exact(LANES),
    );
    for ((x, y), z) in (&mut ca).zip(&mut cb).zip(&mut cc) {
        for l in 0..LANES {
            acc[l] += f(x[l].to_f64(), y[l].to_f64(), z[l].to_f64());
        }
    }
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .zip(cc.remainder())
        .map(|((x, y), z)| f(x.to_f64(), y.to_f64(), z.to_f64()))
        .sum();
    acc.iter().sum::<f64>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 8.0
            })
            .collect()
    }

    #[test]
    fn reductions_equal_the_sequential_ones_at_every_length() {
        // Lengths around the lane count leave every remainder, including none and all.
        for n in (0..40).chain([576, 1003]) {
            let (a, b, c) = (data(n, 1), data(n, 2), data(n, 3));
            let want_max = a.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            assert_eq!(max(&a), want_max, "length {n}");
            let want: f64 = a.iter().map(|&v| (v as f64 - 0.5).powi(2)).sum();
            let got = sum_by(&a, |v| (v - 0.5) * (v - 0.5));
            assert!(
                (got - want).abs() <= 1e-12 * want.abs().max(1.0),
                "{got} vs {want}"
            );
            let want: f64 = (0..n)
                .map(|i| a[i] as f64 * b[i] as f64 * (c[i] as f64 - 0.25))
                .sum();
            let got = sum3_by(&a, &b, &c, |x, y, z| x * y * (z - 0.25));
            assert!(
                (got - want).abs() <= 1e-12 * want.abs().max(1.0),
                "{got} vs {want}"
            );
            // In f32: each product and sum rounded, within a few ulp of the terms' magnitude.
            let want: f64 = (0..n).map(|i| a[i] as f64 * b[i] as f64).sum();
            let scale: f64 = (0..n).map(|i| (a[i] as f64 * b[i] as f64).abs()).sum();
            let got = dot(&a, &b) as f64;
            assert!(
                (got - want).abs() <= 1e-6 * scale.max(1.0),
                "{got} vs {want}"
            );
        }
        // The largest element in each lane position and in the tail.
        for at in 0..19 {
            let mut xs = vec![-1.0f32; 19];
            xs[at] = 3.0;
            assert_eq!(max(&xs), 3.0);
        }
        assert_eq!(max::<f64>(&[]), f64::NEG_INFINITY);
    }

    #[test]
    #[should_panic(expected = "lengths")]
    fn sums_over_slices_of_different_lengths_are_refused() {
        sum3_by(&[1.0f32, 2.0], &[1.0], &[1.0, 2.0], |x, y, z| x * y * z);
    }
}
