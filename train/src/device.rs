//! Choosing the device: `cpu`, or `cuda:N` when built with the `cuda` feature (one worker process
//! per GPU).

use anyhow::{bail, Context, Result};
use candle_core::Device;

/// Parses `cpu`, `cuda` (= `cuda:0`) or `cuda:N`.
pub fn parse(name: &str) -> Result<Device> {
    let ordinal = match name {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        other => match other.strip_prefix("cuda:") {
            Some(n) => n.parse::<usize>().with_context(|| format!("`{other}`: the GPU number after `cuda:`"))?,
            None => bail!("unknown device `{other}`: use `cpu` or `cuda:N`"),
        },
    };
    cuda(ordinal)
}

#[cfg(feature = "cuda")]
fn cuda(ordinal: usize) -> Result<Device> {
    Device::new_cuda(ordinal).with_context(|| format!("opening cuda:{ordinal}"))
}

#[cfg(not(feature = "cuda"))]
fn cuda(ordinal: usize) -> Result<Device> {
    bail!(
        "cuda:{ordinal}: this cpt-worker was built without the `cuda` feature (cargo build --release --features cuda)"
    )
}

/// The name `parse` accepts for `device`.
pub fn name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Memory a job on `device` can use at most: the machine's RAM on the CPU (`MemTotal`), unknown
/// elsewhere.
pub fn memory_bytes(device: &Device) -> Option<u64> {
    if !device.is_cpu() {
        return None;
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_parse_and_unknown_devices_are_refused() {
        assert!(super::parse("cpu").unwrap().is_cpu());
        assert_eq!(super::name(&super::parse("cpu").unwrap()), "cpu");
        assert!(super::parse("gpu").unwrap_err().to_string().contains("use `cpu` or `cuda:N`"));
        assert!(super::parse("cuda:x").unwrap_err().to_string().contains("GPU number"));
        #[cfg(not(feature = "cuda"))]
        assert!(super::parse("cuda:1").unwrap_err().to_string().contains("without the `cuda` feature"));
    }
}
