//! `exp` over slices, vectorised: libm's scalar `expf` was the largest cost of the fused softmax
//! and cross-entropy kernels. Cephes' polynomial (relative error ≈ 1e-7, like `expf`), branch-free
//! and without float-to-int conversions; AVX2+FMA intrinsics are chosen at run time.

/// `out[j] = exp(x[j]·scale − shift) · factor`; returns `Σ exp(x[j]·scale − shift)`.
pub fn exp_shifted_f32(x: &[f32], scale: f32, shift: f32, factor: f32, out: &mut [f32]) -> f32 {
    assert!(out.len() >= x.len(), "exp_shifted: an output shorter than the input");
    // SAFETY: x holds x.len() elements and out at least as many.
    unsafe { exp_shifted_raw(x.as_ptr(), out.as_mut_ptr(), x.len(), scale, shift, factor) }
}

/// [`exp_shifted_f32`] with `row` as both input and output.
pub fn exp_shifted_in_place_f32(row: &mut [f32], scale: f32, shift: f32, factor: f32) -> f32 {
    let ptr = row.as_mut_ptr();
    // SAFETY: row holds row.len() elements; each is read before it is written.
    unsafe { exp_shifted_raw(ptr, ptr, row.len(), scale, shift, factor) }
}

/// # Safety
/// `x` must be valid for `len` reads and `out` for `len` writes; they may be the same elements,
/// and otherwise must not overlap.
unsafe fn exp_shifted_raw(x: *const f32, out: *mut f32, len: usize, scale: f32, shift: f32, factor: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function is compiled for; the pointers as above.
        return unsafe { exp_shifted_avx2(x, out, len, scale, shift, factor) };
    }
    // SAFETY: as above.
    unsafe { exp_shifted_portable(x, out, len, scale, shift, factor) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_shifted_avx2(x: *const f32, out: *mut f32, len: usize, scale: f32, shift: f32, factor: f32) -> f32 {
    use std::arch::x86_64::*;
    // Written with intrinsics: the compiler's vectoriser left half of the portable loop scalar.
    let whole = len / 8 * 8;
    let (scale_v, shift_v, factor_v) = (_mm256_set1_ps(scale), _mm256_set1_ps(shift), _mm256_set1_ps(factor));
    let mut sums = _mm256_setzero_ps();
    for j in (0..whole).step_by(8) {
        // SAFETY: j + 8 ≤ whole ≤ len; the eight inputs are loaded before their outputs are stored.
        let e = exp_avx2(_mm256_fmsub_ps(_mm256_loadu_ps(x.add(j)), scale_v, shift_v));
        sums = _mm256_add_ps(sums, e);
        _mm256_storeu_ps(out.add(j), _mm256_mul_ps(e, factor_v));
    }
    let mut lanes = [0.0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), sums);
    let mut sum: f32 = lanes.iter().sum();
    for j in whole..len {
        let e = exp((*x.add(j)).mul_add(scale, -shift));
        sum += e;
        *out.add(j) = e * factor;
    }
    sum
}

/// [`exp`] on eight lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_avx2(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let c = |v: f32| _mm256_set1_ps(v);
    // max/min return their second operand when one is NaN: NaN stays NaN.
    let x = _mm256_min_ps(c(88.0), _mm256_max_ps(c(-87.0), x));
    let rounded = _mm256_fmadd_ps(x, c(std::f32::consts::LOG2_E), c(ROUND));
    let n = _mm256_sub_ps(rounded, c(ROUND));
    let r = _mm256_fmadd_ps(n, c(LN2_HIGH), x);
    let r = _mm256_fmadd_ps(n, c(LN2_LOW), r);
    let mut p = c(P[0]);
    for &coefficient in &P[1..] {
        p = _mm256_fmadd_ps(p, r, c(coefficient));
    }
    let y = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), c(1.0));
    let bits = _mm256_sub_epi32(_mm256_castps_si256(rounded), _mm256_set1_epi32(ROUND_BITS - 127));
    _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32::<23>(bits)))
}

/// # Safety
/// As [`exp_shifted_raw`].
#[inline(always)]
unsafe fn exp_shifted_portable(x: *const f32, out: *mut f32, len: usize, scale: f32, shift: f32, factor: f32) -> f32 {
    // Eight partial sums, like the vector path's lanes.
    let mut sums = [0.0f32; 8];
    for j in 0..len {
        let e = exp((*x.add(j)).mul_add(scale, -shift));
        sums[j % 8] += e;
        *out.add(j) = e * factor;
    }
    sums.iter().sum()
}

/// Adding 1.5·2²³ rounds to an integer held in the low mantissa bits: n = round(x·log₂e) without
/// a float-to-int conversion (Rust's saturating one stops vectorisation).
const ROUND: f32 = 12_582_912.0;
/// `ROUND`'s bits: the rounded value's bits are `ROUND_BITS + n`.
const ROUND_BITS: i32 = 0x4B40_0000;
/// ln 2 in two parts, so that n·ln2 is exact enough for the reduction.
const LN2_HIGH: f32 = -0.693_359_4;
const LN2_LOW: f32 = 2.121_944_4e-4;
/// Cephes' polynomial for (eʳ − 1 − r) / r², highest power first.
const P: [f32; 6] = [1.987_569_2e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5];

/// `e^x` for `x ≤ 88`; arguments below −87 give ≈ 0, and NaN stays NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let rounded = x.mul_add(std::f32::consts::LOG2_E, ROUND);
    let n = rounded - ROUND;
    // x = n·ln2 + r, |r| ≤ ln2/2.
    let r = n.mul_add(LN2_LOW, n.mul_add(LN2_HIGH, x));
    let p = P[1..].iter().fold(P[0], |p, &coefficient| p.mul_add(r, coefficient));
    let y = (p * r).mul_add(r, r) + 1.0;
    // 2ⁿ for the n in [−126, 127] that the clamp allows.
    let bits = (rounded.to_bits() as i32).wrapping_sub(ROUND_BITS - 127);
    y * f32::from_bits((bits as u32) << 23)
}

#[cfg(test)]
mod tests {
    #[test]
    fn matches_libm_to_a_few_ulps_over_the_softmax_range() {
        let mut worst = 0.0f64;
        for i in 0..200_000 {
            let x = -87.0 + i as f32 * (87.0 + 10.0) / 200_000.0;
            let (ours, libm) = (super::exp(x) as f64, (x as f64).exp());
            worst = worst.max(((ours - libm) / libm).abs());
        }
        assert!(worst < 5e-7, "relative error {worst}");
        let x: Vec<f32> = (0..1003).map(|i| (i as f32 * 0.37).sin() * 20.0).collect();
        let mut out = vec![0.0; x.len()];
        let sum = super::exp_shifted_f32(&x, 0.5, 1.0, 2.0, &mut out);
        let expected: f64 = x.iter().map(|&v| (v as f64 * 0.5 - 1.0).exp()).sum();
        assert!(((sum as f64 - expected) / expected).abs() < 1e-6);
        assert!(out
            .iter()
            .zip(&x)
            .all(|(&o, &v)| ((o as f64 - 2.0 * (v as f64 * 0.5 - 1.0).exp()).abs()) <= 1e-6 * o as f64));
    }

    #[test]
    fn the_vector_path_gives_the_scalar_path_bits_and_keeps_nan() {
        let mut x: Vec<f32> = (0..4099).map(|i| (i as f32 * 0.731).sin() * 120.0).collect();
        x.extend([f32::NAN, f32::NEG_INFINITY, f32::INFINITY, -87.5, 88.5, 0.0, -0.0]);
        x.extend((0..5).map(|i| i as f32 * 0.25));
        let (mut fast, mut portable) = (vec![0.0; x.len()], vec![0.0; x.len()]);
        let fast_sum = super::exp_shifted_f32(&x[..4099], 0.5, 0.25, 3.0, &mut fast[..4099]);
        // SAFETY: both hold 4099 elements or more.
        let portable_sum =
            unsafe { super::exp_shifted_portable(x.as_ptr(), portable.as_mut_ptr(), 4099, 0.5, 0.25, 3.0) };
        assert!(((fast_sum - portable_sum) / portable_sum).abs() < 1e-6, "{fast_sum} vs {portable_sum}");
        super::exp_shifted_f32(&x, 1.0, 0.0, 1.0, &mut fast);
        for (i, (&f, &v)) in fast.iter().zip(&x).enumerate() {
            let scalar = super::exp(v);
            assert!(
                f.to_bits() == scalar.to_bits() || (f.is_nan() && scalar.is_nan()),
                "x[{i}] = {v}: {f} vs {scalar}"
            );
        }
        assert!(fast[4099].is_nan(), "NaN in, NaN out");
        let mut in_place = x.clone();
        super::exp_shifted_in_place_f32(&mut in_place, 1.0, 0.0, 1.0);
        assert!(in_place.iter().zip(&fast).all(|(a, b)| a.to_bits() == b.to_bits()), "in place as out of place");
        assert!((0.0..1e-37).contains(&fast[4100]), "exp(−∞) ≈ 0");
        assert!(fast[4101].is_finite() && fast[4101] > 1e38, "exp(∞) clamps to exp(88)");
    }
}
