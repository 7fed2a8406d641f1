//! `exp` over slices, vectorised: libm's scalar `expf` was the largest cost of the fused softmax
//! and cross-entropy kernels. Cephes' polynomial for `2^f` (relative error ≈ 1e-7, like `expf`),
//! written branch-free so the compiler vectorises it; AVX2+FMA code is chosen at run time.

/// `out[j] = exp(x[j]·scale − shift) · factor`; returns `Σ exp(x[j]·scale − shift)`.
pub fn exp_shifted_f32(x: &[f32], scale: f32, shift: f32, factor: f32, out: &mut [f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { exp_shifted_avx2(x, scale, shift, factor, out) };
    }
    exp_shifted_portable(x, scale, shift, factor, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_shifted_avx2(x: &[f32], scale: f32, shift: f32, factor: f32, out: &mut [f32]) -> f32 {
    exp_shifted_portable(x, scale, shift, factor, out)
}

#[inline(always)]
fn exp_shifted_portable(x: &[f32], scale: f32, shift: f32, factor: f32, out: &mut [f32]) -> f32 {
    // Eight partial sums keep the reduction vectorisable.
    let mut sums = [0.0f32; 8];
    let whole = x.len() / 8 * 8;
    let (x, x_rest) = x.split_at(whole);
    let (out, out_rest) = out[..x.len() + x_rest.len()].split_at_mut(whole);
    for (x, out) in x.chunks_exact(8).zip(out.chunks_exact_mut(8)) {
        for i in 0..8 {
            let e = exp(x[i] * scale - shift);
            sums[i] += e;
            out[i] = e * factor;
        }
    }
    let mut sum: f32 = sums.iter().sum();
    for (&x, out) in x_rest.iter().zip(out_rest) {
        let e = exp(x * scale - shift);
        sum += e;
        *out = e * factor;
    }
    sum
}

/// `e^x` for `x ≤ 88`; arguments below −87 give ≈ 0.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    // x = n·ln2 + r, |r| ≤ ln2/2; floor without libm: truncate, then step down for negatives.
    let t = x * std::f32::consts::LOG2_E + 0.5;
    let truncated = t as i32;
    let n = truncated - ((truncated as f32) > t) as i32;
    let nf = n as f32;
    let r = x - nf * 0.693_359_4 + nf * 2.121_944_4e-4;
    let p = 1.987_569_2e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(((n + 127) as u32) << 23)
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
}
