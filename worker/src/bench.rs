//! `cpt-worker bench` (training steps of a random model, timed) and `check-kernels` (the device's
//! fused ops against the composed ones in f64).

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::Device;
use cpt_train::bench::BenchOptions;

/// Times training steps of a random model of the shape in `config` and prints the JSON report.
pub fn bench(config: &Path, options: &BenchOptions) -> Result<()> {
    let text = std::fs::read_to_string(config).with_context(|| format!("reading {}", config.display()))?;
    let model_config =
        cpt_train::ModelConfig::from_json_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", config.display()))?;
    let report = cpt_train::bench::bench(&model_config, options)?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// A job spec's `adapter` section from a JSON file, validated.
pub fn read_adapter(path: &Path) -> Result<cpt_protocol::adapter::AdapterSpec> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let adapter: cpt_protocol::adapter::AdapterSpec =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    adapter.validate().with_context(|| format!("in {}", path.display()))?;
    Ok(adapter)
}

/// Prints one JSON line per op and dtype; fails when one is off.
pub fn check_kernels(device: &Device) -> Result<()> {
    let checks = cpt_train::kernel_check::check_kernels(device)?;
    for check in &checks {
        println!("{}", serde_json::to_string(check)?);
    }
    if let Some(bad) = checks.iter().find(|c| !c.ok) {
        anyhow::bail!("{} in {} is off by {:.2e} (tolerance {:.0e})", bad.op, bad.dtype, bad.max_error, bad.tolerance);
    }
    Ok(())
}
