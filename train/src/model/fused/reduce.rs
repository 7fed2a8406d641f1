//! Row reductions over eight running partials. One running sum (or maximum) is a chain of
//! dependent operations that the compiler may not reorder for floats, so the norms' and the
//! softmaxes' reductions ran one element per add latency; eight independent lanes vectorise.

use num_traits::Float;

use super::Real;

const LANES: usize = 8;

/// `Σ f(a[i], b[i], c[i])` over the common length, in eight lanes.
#[inline(always)]
fn lane_sum<T: Real>(a: &[T], b: &[T], c: &[T], f: impl Fn(T, T, T) -> T) -> T {
    let n = a.len().min(b.len()).min(c.len());
    let (a, b, c) = (a[..n].chunks_exact(LANES), b[..n].chunks_exact(LANES), c[..n].chunks_exact(LANES));
    let tails = a.remainder().iter().zip(b.remainder()).zip(c.remainder());
    let tail = tails.fold(T::zero(), |s, ((&a, &b), &c)| s + f(a, b, c));
    let mut lanes = [T::zero(); LANES];
    for ((a, b), c) in a.zip(b).zip(c) {
        for i in 0..LANES {
            lanes[i] += f(a[i], b[i], c[i]);
        }
    }
    lanes.iter().fold(tail, |s, &lane| s + lane)
}

/// `Σ x²`.
pub(super) fn sum_of_squares<T: Real>(x: &[T]) -> T {
    lane_sum(x, x, x, |a, _, _| a * a)
}

/// `Σ a·b`.
pub(super) fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    lane_sum(a, b, b, |a, b, _| a * b)
}

/// `Σ a·b·c`.
pub(super) fn dot3<T: Real>(a: &[T], b: &[T], c: &[T]) -> T {
    lane_sum(a, b, c, |a, b, c| a * b * c)
}

/// The largest element, ignoring NaN as `f32::max` does (−∞ for an empty or all-NaN row).
pub(super) fn max<T: Real>(x: &[T]) -> T {
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder().iter().fold(T::neg_infinity(), |m, &v| Float::max(m, v));
    let mut lanes = [T::neg_infinity(); LANES];
    for chunk in chunks {
        for i in 0..LANES {
            lanes[i] = Float::max(lanes[i], chunk[i]);
        }
    }
    lanes.iter().fold(tail, |m, &lane| Float::max(m, lane))
}

#[cfg(test)]
mod tests {
    #[test]
    fn lanes_give_the_sequential_results() {
        for n in [0, 1, 7, 8, 9, 31, 100] {
            let a: Vec<f64> = (0..n).map(|i| ((i * 37 % 11) as f64 - 5.0) * 0.25).collect();
            let b: Vec<f64> = (0..n).map(|i| (i as f64 * 0.7).cos()).collect();
            // Quarter multiples add exactly: the lane order cannot change these sums.
            assert_eq!(super::sum_of_squares(&a), a.iter().map(|x| x * x).sum::<f64>());
            let dot: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((super::dot(&a, &b) - dot).abs() < 1e-12, "n = {n}");
            let dot3: f64 = a.iter().zip(&b).map(|(x, y)| x * y * y).sum();
            assert!((super::dot3(&a, &b, &b) - dot3).abs() < 1e-12, "n = {n}");
            assert_eq!(super::max(&a), a.iter().copied().fold(f64::NEG_INFINITY, f64::max));
        }
        let mut x = vec![1.0f32, f32::NAN, 3.0, -2.0, 0.5, 9.0, 4.0, 2.0, 8.5];
        assert_eq!(super::max(&x), 9.0, "NaN is skipped");
        x[5] = f32::NAN;
        assert_eq!(super::max(&x), 8.5, "the maximum in the tail");
        assert_eq!(super::max::<f32>(&[f32::NAN; 9]), f32::NEG_INFINITY);
    }
}
