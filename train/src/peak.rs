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

/// The CPU's f32 peak in FLOP/s: physical cores in use × clock × FLOPs per cycle of the cores' FMA
/// units, read from /proc/cpuinfo and sysfs, or a matrix multiply's measured rate where that is
/// higher (see [`at_least_measured`]); where /proc/cpuinfo says nothing, the multiply alone.
/// `CPT_PEAK_FLOPS` overrides it. Measured once per process.
///
/// A short matmul probe reaches only part of the machine's peak, so MFU against it read 80–94% for
/// jobs whose true figure was nearer 70%; the data-sheet arithmetic is the honest denominator.
pub fn cpu_peak() -> (f64, String) {
    static PEAK: OnceLock<(f64, String)> = OnceLock::new();
    PEAK.get_or_init(|| {
        if let Some(value) = std::env::var("CPT_PEAK_FLOPS").ok().and_then(|v| v.parse::<f64>().ok()) {
            return (value, "CPT_PEAK_FLOPS".to_string());
        }
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let max_khz = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
            .ok()
            .and_then(|text| text.trim().parse::<f64>().ok());
        let cores = physical_cores(rayon::current_num_threads());
        match CpuCores::parse(&cpuinfo, max_khz) {
            Some(cpu) => at_least_measured(cpu.peak(cores), probe()),
            None => probe(),
        }
    })
    .clone()
}

/// What /proc/cpuinfo says of the first core.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuCores {
    pub model: String,
    pub vendor: String,
    pub family: u32,
    /// The nominal clock in GHz (sysfs's maximum where present, else /proc/cpuinfo's `cpu MHz`).
    pub ghz: f64,
    pub avx512: bool,
    pub avx2_fma: bool,
}

impl CpuCores {
    /// The first processor's entry of /proc/cpuinfo, with sysfs's maximum clock where known;
    /// `None` without a clock or flags.
    pub fn parse(cpuinfo: &str, max_khz: Option<f64>) -> Option<Self> {
        let first = cpuinfo.split("\n\n").next()?;
        let field = |name: &str| {
            first.lines().find_map(|line| {
                let (key, value) = line.split_once(':')?;
                (key.trim() == name).then(|| value.trim().to_string())
            })
        };
        let flags = field("flags")?;
        let has = |flag: &str| flags.split_whitespace().any(|f| f == flag);
        let ghz = match max_khz {
            Some(khz) => khz / 1e6,
            None => field("cpu MHz")?.parse::<f64>().ok()? / 1e3,
        };
        Some(Self {
            model: field("model name").unwrap_or_default(),
            vendor: field("vendor_id").unwrap_or_default(),
            family: field("cpu family").and_then(|f| f.parse().ok()).unwrap_or(0),
            ghz,
            avx512: has("avx512f"),
            avx2_fma: has("avx2") && has("fma"),
        })
    }

    /// f32 FLOPs per cycle of one core, and the units behind the number: two FMA units of the
    /// widest vectors the core executes at full rate (Zen 4 splits AVX-512 into two 256-bit halves;
    /// Zen 5 and Intel's server cores have two 512-bit units).
    pub fn flops_per_cycle(&self) -> (f64, &'static str) {
        let amd = self.vendor == "AuthenticAMD";
        match (self.avx512, self.avx2_fma) {
            (true, _) if amd && self.family < 0x1a => (32.0, "2 × 256-bit FMA (AVX-512 in halves)"),
            (true, _) => (64.0, "2 × 512-bit FMA"),
            (false, true) => (32.0, "2 × 256-bit FMA"),
            (false, false) => (8.0, "128-bit mul + add"),
        }
    }

    /// The peak of `cores` such cores, and where it came from.
    pub fn peak(&self, cores: usize) -> (f64, String) {
        let (per_cycle, units) = self.flops_per_cycle();
        let peak = cores as f64 * self.ghz * 1e9 * per_cycle;
        let model = if self.model.is_empty() { "unknown CPU" } else { &self.model };
        (peak, format!("{model}: {cores} cores × {:.2} GHz × {per_cycle} f32 FLOP/cycle ({units})", self.ghz))
    }
}

/// Physical cores that `threads` busy threads can use: SMT siblings share their FMA units, so
/// two threads on one core add no peak.
fn physical_cores(threads: usize) -> usize {
    let logical = std::thread::available_parallelism().map_or(threads, usize::from);
    let cores: std::collections::BTreeSet<(String, String)> = (0..logical)
        .filter_map(|cpu| {
            let read =
                |file: &str| std::fs::read_to_string(format!("/sys/devices/system/cpu/cpu{cpu}/topology/{file}")).ok();
            Some((read("physical_package_id")?, read("core_id")?))
        })
        .collect();
    let physical = if cores.is_empty() { logical } else { cores.len() };
    threads.min(physical).max(1)
}

/// The declared clock's peak, or the measured rate where a matrix multiply beat it.
///
/// A virtual machine often declares its nominal clock (no sysfs maximum, `cpu MHz` fixed) while the
/// host boosts the cores past it: on a 2-core "AMD EPYC" (Zen 3) that declares 2.45 GHz, gemm ran at
/// 168 GFLOP/s against a derived 157, and MFU read 83% for a step at 130. No program outruns the
/// peak, so a faster multiply proves the clock higher than declared, and its rate is the tighter
/// lower bound on the peak.
fn at_least_measured(declared: (f64, String), measured: (f64, String)) -> (f64, String) {
    if measured.0 > declared.0 {
        let source = format!("{}; measured above it, so the peak is the measured rate: {}", declared.1, measured.1);
        (measured.0, source)
    } else {
        declared
    }
}

/// The best of a few 1024³ f32 matrix multiplies on this CPU, in FLOP/s.
fn probe() -> (f64, String) {
    let n = 1024;
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
        Ok(flops) => (flops, format!("{:.1} GFLOP/s, the best of 5 {n}³ f32 matrix multiplies", flops / 1e9)),
        // NaN loses every comparison, so a declared peak stands.
        Err(e) => (f64::NAN, format!("cpu probe failed: {e}")),
    }
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

#[cfg(test)]
mod tests {
    use super::{at_least_measured, CpuCores};

    fn cpuinfo(vendor: &str, family: u32, model: &str, flags: &str) -> String {
        format!(
            "processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel name\t: {model}\n\
             cpu MHz\t\t: 2450.000\nflags\t\t: fpu sse2 {flags}\n\nprocessor\t: 1\n"
        )
    }

    #[test]
    fn flops_per_cycle_follow_the_cores_fma_units() {
        let cases = [
            ("AuthenticAMD", 25, "AMD EPYC 7B13", "avx2 fma", 32.0),
            ("AuthenticAMD", 25, "AMD EPYC 9B14", "avx2 fma avx512f", 32.0),
            ("AuthenticAMD", 26, "AMD EPYC 9B45", "avx2 fma avx512f", 64.0),
            ("GenuineIntel", 6, "Intel(R) Xeon(R) Platinum 8581C", "avx2 fma avx512f", 64.0),
            ("GenuineIntel", 6, "Old", "sse4_2", 8.0),
        ];
        for (vendor, family, model, flags, expected) in cases {
            let cpu = CpuCores::parse(&cpuinfo(vendor, family, model, flags), None).unwrap();
            assert_eq!(cpu.flops_per_cycle().0, expected, "{model}");
            assert_eq!(cpu.model, model);
            let (peak, source) = cpu.peak(2);
            assert!((peak - 2.0 * 2.45e9 * expected).abs() < 1.0, "{model}: {peak}");
            assert!(source.starts_with(model) && source.contains("2 cores"), "{source}");
        }
        let turbo = CpuCores::parse(&cpuinfo("GenuineIntel", 6, "Xeon", "avx2 fma"), Some(3.5e6)).unwrap();
        assert_eq!(turbo.ghz, 3.5, "sysfs's maximum clock wins over the current one");
        assert_eq!(CpuCores::parse("processor : 0\nmodel name : no flags\n", None), None);
    }

    #[test]
    fn a_multiply_faster_than_the_declared_clock_allows_raises_the_peak() {
        let declared = || (156.8e9, "AMD EPYC: 2 cores × 2.45 GHz × 32 f32 FLOP/cycle".to_string());
        let (peak, source) = at_least_measured(declared(), (168.0e9, "168.0 GFLOP/s, gemm".to_string()));
        assert_eq!(peak, 168.0e9);
        assert!(source.starts_with("AMD EPYC: 2 cores") && source.ends_with("168.0 GFLOP/s, gemm"), "{source}");
        assert_eq!(at_least_measured(declared(), (120.0e9, "slower".to_string())), declared());
        assert_eq!(at_least_measured(declared(), (f64::NAN, "failed".to_string())), declared());
    }
}
