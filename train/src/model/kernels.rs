//! The implementations a forward pass can use for the model's operations.

use candle_core::Tensor;

use super::fused;

/// Which implementation of the model's operations a forward pass uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Kernels {
    /// The fastest that the tensors' device and dtype have (the default): [`Kernels::Cpu`] for
    /// f32/f64 on the CPU, [`Kernels::Portable`] for f32/bf16 on CUDA, [`Kernels::Composed`]
    /// otherwise.
    #[default]
    Best,
    /// Whole-block CPU kernels: packed attention, the output projection fused with the loss, gemm
    /// for every linear layer.
    Cpu,
    /// The fused ops that have both CPU and CUDA kernels (RMSNorm, RoPE, causal softmax, SwiGLU,
    /// cross-entropy) around candle's matrix products.
    Portable,
    /// candle's differentiable ops only: the reference.
    Composed,
}

impl Kernels {
    /// The concrete choice for tensors like `x`.
    pub fn resolve(self, x: &Tensor) -> Kernels {
        match self {
            Kernels::Best if fused::supported(x) => Kernels::Cpu,
            Kernels::Best if fused::cuda_supported(x) => Kernels::Portable,
            Kernels::Best => Kernels::Composed,
            chosen => chosen,
        }
    }
}

impl std::str::FromStr for Kernels {
    type Err = String;
    fn from_str(name: &str) -> std::result::Result<Self, String> {
        match name {
            "best" => Ok(Kernels::Best),
            "cpu" => Ok(Kernels::Cpu),
            "portable" => Ok(Kernels::Portable),
            "composed" => Ok(Kernels::Composed),
            other => Err(format!("unknown kernels {other:?}: best, cpu, portable or composed")),
        }
    }
}

impl std::fmt::Display for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kernels::Best => "best",
            Kernels::Cpu => "cpu",
            Kernels::Portable => "portable",
            Kernels::Composed => "composed",
        })
    }
}
