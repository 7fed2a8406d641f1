//! The peak FLOP/s that MFU is measured against.

use std::sync::OnceLock;
use std::time::Instant;

use candle_core::{Device, Tensor};

/// Dense peak FLOP/s of known accelerators for the precision used (bf16 tensor cores / f32),
/// from the vendors' data sheets, without sparsity.
pub const GPU_PEAKS: [(&str, f64, f64); 6] = [
    // (name fragment, bf16, f32)
    ("H200", 989e12, 67e12),
    ("H100", 989e12, 67e12),
    ("A100", 312e12, 19.5e12),
    ("L40S", 362e12, 91.6e12),
    ("A10G", 125e12, 31.2e12),
    ("RTX 4090", 165e12, 82.6e12),
];

/// The peak for a device named `name` (bf16 when `bf16`), if it is in [`GPU_PEAKS`].
pub fn gpu_peak(name: &str, bf16: bool) -> Option<f64> {
    GPU_PEAKS.iter().find(|(fragment, _, _)| name.contains(fragment)).map(|&(_, b, f)| if bf16 { b } else { f })
}

/// The best of a few 512³ f32 matrix multiplies on this CPU, in FLOP/s; measured once per process.
///
/// A measured peak is honest about the machine at hand (core count, vector width, thermal
/// state), which a data-sheet number for an unknown CPU cannot be. `CPT_PEAK_FLOPS` overrides it.
pub fn cpu_peak() -> (f64, String) {
    static PEAK: OnceLock<(f64, String)> = OnceLock::new();
    PEAK.get_or_init(|| {
        if let Some(value) = std::env::var("CPT_PEAK_FLOPS").ok().and_then(|v| v.parse::<f64>().ok()) {
            return (value, "CPT_PEAK_FLOPS".to_string());
        }
        let n = 512;
        let measure = || -> candle_core::Result<f64> {
            let a = Tensor::ones((n, n), candle_core::DType::F32, &Device::Cpu)?;
            let b = Tensor::ones((n, n), candle_core::DType::F32, &Device::Cpu)?;
            let mut best = f64::MAX;
            for _ in 0..5 {
                let start = Instant::now();
                let c = a.matmul(&b)?;
                c.sum_all()?.to_scalar::<f32>()?;
                best = best.min(start.elapsed().as_secs_f64());
            }
            Ok(2.0 * (n * n * n) as f64 / best)
        };
        match measure() {
            Ok(flops) => (flops, format!("cpu matmul probe ({n}³ f32, best of 5)")),
            Err(e) => (f64::NAN, format!("cpu probe failed: {e}")),
        }
    })
    .clone()
}

/// The peak of GPU `ordinal` for bf16 or f32 training: `CPT_PEAK_FLOPS`, else its name (from
/// `nvidia-smi`) looked up in [`GPU_PEAKS`].
pub fn cuda_peak(ordinal: usize, bf16: bool) -> (f64, String) {
    if let Some(value) = std::env::var("CPT_PEAK_FLOPS").ok().and_then(|v| v.parse::<f64>().ok()) {
        return (value, "CPT_PEAK_FLOPS".to_string());
    }
    let name = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=name", "--format=csv,noheader", "-i", &ordinal.to_string()])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string());
    let precision = if bf16 { "bf16" } else { "f32" };
    match name {
        Some(name) => match gpu_peak(&name, bf16) {
            Some(peak) => (peak, format!("{name}, dense {precision} data-sheet peak")),
            None => (f64::NAN, format!("{name}: unknown peak (set CPT_PEAK_FLOPS)")),
        },
        None => (f64::NAN, "nvidia-smi unavailable (set CPT_PEAK_FLOPS)".to_string()),
    }
}
