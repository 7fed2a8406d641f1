//! The fused ops on a device against the composed reference ops on the CPU in f64: outputs and
//! input gradients on random inputs, in each dtype the device's kernels store (f32; bf16 on CUDA).
//! `cpt-worker check-kernels --device cuda:0` runs it on a GPU; the tests run it on the CPU.

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::model::{fused, ops};

/// One op in one dtype.
#[derive(Debug, Clone, Serialize)]
pub struct KernelCheck {
    pub op: &'static str,
    pub dtype: String,
    /// The largest `|device − reference| / (1 + |reference|)` over the output and every gradient.
    pub max_error: f64,
    pub tolerance: f64,
    pub ok: bool,
}

/// The dtypes whose kernels `device` has for the portable fused ops, with each one's tolerance.
fn dtypes(device: &Device) -> Vec<(DType, f64)> {
    match device {
        Device::Cpu => vec![(DType::F32, 1e-4)],
        _ => vec![(DType::F32, 1e-4), (DType::BF16, 4e-2)],
    }
}

fn random(shape: &[usize], seed: u64, scale: f64) -> Result<Tensor> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let values: Vec<f64> = (0..shape.iter().product()).map(|_| rng.random_range(-scale..scale)).collect();
    Tensor::from_vec(values, shape, &Device::Cpu)
}

type Op<'a> = Box<dyn Fn(&[Tensor]) -> Result<Tensor> + 'a>;

/// The output of `f` and the gradients of `sum(output · projection)`, as f64 on the CPU.
fn run(
    inputs: &[Tensor],
    dtype: DType,
    device: &Device,
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
) -> Result<Vec<Vec<f64>>> {
    let vars =
        inputs.iter().map(|t| Var::from_tensor(&t.to_dtype(dtype)?.to_device(device)?)).collect::<Result<Vec<_>>>()?;
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&tensors)?;
    let projection = random(out.dims(), 77, 1.0)?.to_dtype(out.dtype())?.to_device(device)?;
    let grads = (&out * &projection)?.sum_all()?.backward()?;
    let flat = |t: &Tensor| t.to_dtype(DType::F64)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f64>();
    let mut all = vec![flat(&out)?];
    for var in &vars {
        if let Some(grad) = grads.get(var) {
            all.push(flat(grad)?);
        }
    }
    Ok(all)
}

/// Checks every portable fused op on `device`.
pub fn check_kernels(device: &Device) -> Result<Vec<KernelCheck>> {
    let (rows, hidden, seq, d, vocab) = (96, 160, 40, 16, 3000);
    let inv_freq: Vec<f64> = (0..d / 2).map(|i| 1.0 / 10000f64.powf(2.0 * i as f64 / d as f64)).collect();
    let targets: Vec<u32> = (0..rows).map(|i| (i * 7919 % vocab) as u32).collect();
    let targets = Tensor::new(targets.as_slice(), &Device::Cpu)?;
    let tables = |dtype: DType, device: &Device| ops::rope_tables(&inv_freq, seq, dtype, device);
    // (name, inputs, fused op, reference op); every op takes tensors on one device and dtype.
    let cases: Vec<(&'static str, Vec<Tensor>, Op, Op)> = vec![
        (
            "rms-norm",
            vec![random(&[rows, hidden], 1, 2.0)?, random(&[hidden], 2, 1.0)?],
            Box::new(|x| fused::rms_norm(&x[0], &x[1], 1e-5)),
            Box::new(|x| ops::rms_norm(&x[0], &x[1], 1e-5)),
        ),
        (
            "swiglu",
            vec![random(&[rows, 2 * hidden], 3, 4.0)?],
            Box::new(|x| fused::swiglu_packed(&x[0])),
            Box::new(|x| ops::swiglu(&x[0].narrow(1, 0, hidden)?, &x[0].narrow(1, hidden, hidden)?)),
        ),
        (
            "rope",
            vec![random(&[2, 3, seq, d], 4, 1.0)?],
            Box::new(|x| {
                let (cos, sin) = tables(x[0].dtype(), x[0].device())?;
                fused::rope(&x[0], &cos, &sin)
            }),
            Box::new(|x| {
                let (cos, sin) = tables(x[0].dtype(), x[0].device())?;
                ops::rope(&x[0], &cos, &sin)
            }),
        ),
        (
            "causal-softmax",
            vec![random(&[2, 3, seq, seq], 5, 8.0)?],
            Box::new(|x| fused::causal_softmax(&x[0], 0.25, Some(seq / 3))),
            Box::new(|x| {
                let mask = ops::causal_mask(seq, Some(seq / 3), x[0].dtype(), x[0].device())?;
                ops::softmax_last_dim(&(x[0].clone() * 0.25)?.broadcast_add(&mask)?)
            }),
        ),
        (
            "token-nll",
            vec![random(&[rows, vocab], 6, 6.0)?],
            Box::new(|x| fused::token_nll(&x[0], &targets.to_device(x[0].device())?)),
            Box::new(|x| ops::token_nll(&x[0], &targets.to_device(x[0].device())?)),
        ),
    ];
    let mut checks = Vec::new();
    for (op, inputs, fused_op, reference_op) in &cases {
        let reference = run(inputs, DType::F64, &Device::Cpu, reference_op)?;
        for &(dtype, tolerance) in &dtypes(device) {
            let ours = run(inputs, dtype, device, fused_op)?;
            let mut max_error: f64 = if ours.len() == reference.len() { 0.0 } else { f64::INFINITY };
            for (a, b) in ours.iter().zip(&reference) {
                for (x, y) in a.iter().zip(b) {
                    // NaN counts as failure: max() would skip it.
                    let error = (x - y).abs() / (1.0 + y.abs());
                    max_error = if error.is_nan() { f64::INFINITY } else { max_error.max(error) };
                }
            }
            let dtype = format!("{dtype:?}").to_lowercase();
            checks.push(KernelCheck { op, dtype, max_error, tolerance, ok: max_error <= tolerance });
        }
    }
    Ok(checks)
}
