//! The fused kernels against finite differences (f64) and against the composed reference ops, on
//! random inputs of several shapes, forward and backward; and a model trained with them against the
//! same model trained with the composed ops.

mod common;

use candle_core::{DType, Device, Result, Tensor, Var};
use common::{check_gradients, random};
use cpt_protocol::adapter::{AdapterSpec, LORA_TARGETS};
use cpt_train::bench::{bench, BenchOptions};
use cpt_train::model::{fused, ops, Kernels};
use serde_json::json;

/// `f` and `reference` agree on the output and on every input's gradient of `sum(out · projection)`.
fn assert_same_as_reference(
    inputs: &[Tensor],
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
    reference: impl Fn(&[Tensor]) -> Result<Tensor>,
    tolerance: f64,
) {
    let run = |g: &dyn Fn(&[Tensor]) -> Result<Tensor>| {
        let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
        let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let out = g(&tensors).unwrap();
        let projection = random(out.dims(), 77).to_dtype(out.dtype()).unwrap();
        let grads = (&out * &projection).unwrap().sum_all().unwrap().backward().unwrap();
        let flat =
            |t: &Tensor| -> Vec<f64> { t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap() };
        let mut all = vec![flat(&out)];
        all.extend(vars.iter().filter_map(|v| grads.get(v)).map(flat));
        all
    };
    let (ours, theirs) = (run(&f), run(&reference));
    assert_eq!(ours.len(), theirs.len(), "the same inputs receive gradients");
    for (k, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            let what = if k == 0 { "output".to_string() } else { format!("gradient of input {}", k - 1) };
            assert!((x - y).abs() <= tolerance * (1.0 + y.abs()), "{what}, element {i}: fused {x} vs composed {y}");
        }
    }
}

fn f32s(tensors: &[Tensor]) -> Vec<Tensor> {
    tensors.iter().map(|t| t.to_dtype(DType::F32).unwrap()).collect()
}

#[test]
fn fused_rms_norm_matches_finite_differences_and_the_composed_op() {
    check_gradients(&[random(&[3, 5, 8], 1), random(&[8], 2)], |x| fused::rms_norm(&x[0], &x[1], 1e-5));
    for (shape, tolerance) in [(vec![2, 7, 64], 1e-12), (vec![300, 256], 1e-12)] {
        let inputs = [random(&shape, 3), random(&shape[shape.len() - 1..], 4)];
        let (f, r) =
            (|x: &[Tensor]| fused::rms_norm(&x[0], &x[1], 1e-6), |x: &[Tensor]| ops::rms_norm(&x[0], &x[1], 1e-6));
        assert_same_as_reference(&inputs, f, r, tolerance);
        assert_same_as_reference(&f32s(&inputs), f, r, 1e-5);
    }
}

#[test]
fn fused_rope_matches_finite_differences_and_the_composed_op() {
    let config = common::tiny_config("LlamaForCausalLM", json!({}));
    for (seq, tolerance) in [(5, 1e-12), (33, 1e-12)] {
        let (cos, sin) = ops::rope_tables(&config.rope_inv_freq(), seq, DType::F64, &Device::Cpu).unwrap();
        check_gradients(&[random(&[2, 3, seq, 8], 1)], |x| fused::rope(&x[0], &cos, &sin));
        let inputs = [random(&[2, 3, seq, 8], 2)];
        assert_same_as_reference(
            &inputs,
            |x| fused::rope(&x[0], &cos, &sin),
            |x| ops::rope(&x[0], &cos, &sin),
            tolerance,
        );
    }
}

#[test]
fn fused_swiglu_matches_finite_differences_and_the_composed_op() {
    check_gradients(&[random(&[3, 7], 1), random(&[3, 7], 2)], |x| fused::swiglu(&x[0], &x[1]));
    // Longer than one parallel chunk, and not a multiple of it.
    let inputs = [(random(&[3, 5000], 3) * 6.0).unwrap(), random(&[3, 5000], 4)];
    let (f, r) = (|x: &[Tensor]| fused::swiglu(&x[0], &x[1]), |x: &[Tensor]| ops::swiglu(&x[0], &x[1]));
    assert_same_as_reference(&inputs, f, r, 1e-12);
    assert_same_as_reference(&f32s(&inputs), f, r, 1e-5);
}

#[test]
fn fused_cross_entropy_matches_finite_differences_and_the_composed_op() {
    let targets = Tensor::new(&[3u32, 0, 9, 4, 4], &Device::Cpu).unwrap();
    check_gradients(&[(random(&[5, 10], 1) * 4.0).unwrap()], |x| fused::token_nll(&x[0], &targets));
    for (n, vocab) in [(7, 10), (64, 8192), (3, 49152)] {
        let targets: Vec<u32> = (0..n).map(|i| (i * 7919 % vocab) as u32).collect();
        let targets = Tensor::new(targets.as_slice(), &Device::Cpu).unwrap();
        let inputs = [(random(&[n, vocab], 5) * 10.0).unwrap()];
        let (f, r) = (|x: &[Tensor]| fused::token_nll(&x[0], &targets), |x: &[Tensor]| ops::token_nll(&x[0], &targets));
        assert_same_as_reference(&inputs, f, r, 1e-12);
        // f32 runs through the vectorised exp: still within f32 rounding of the composed op.
        assert_same_as_reference(&f32s(&inputs), f, r, 2e-5);
    }
    let outside = Tensor::new(&[10u32], &Device::Cpu).unwrap();
    let error = fused::token_nll(&random(&[1, 10], 1), &outside).unwrap_err().to_string();
    assert!(error.contains("outside a vocabulary of 10"), "{error}");
}

#[test]
fn fused_causal_softmax_in_attention_matches_finite_differences_and_the_composed_op() {
    // The fused path: scores → masked, scaled softmax → values; as the model composes it.
    let attention = |window: Option<usize>| {
        move |x: &[Tensor]| -> Result<Tensor> {
            let (b, heads, s, d) = x[0].dims4()?;
            let kv_heads = x[1].dim(1)?;
            let q = x[0].reshape((b, kv_heads, heads / kv_heads * s, d))?;
            let probs = fused::causal_softmax(&q.matmul(&x[1].t()?)?, 1.0 / (d as f64).sqrt(), window)?;
            probs.matmul(&x[2])?.reshape((b, heads, s, d))
        }
    };
    let reference = |window: Option<usize>| {
        move |x: &[Tensor]| -> Result<Tensor> {
            let mask = ops::causal_mask(x[0].dim(2)?, window, x[0].dtype(), &Device::Cpu)?;
            ops::attention(&x[0], &x[1], &x[2], &mask)
        }
    };
    check_gradients(&[random(&[2, 4, 5, 6], 1), random(&[2, 2, 5, 6], 2), random(&[2, 2, 5, 6], 3)], attention(None));
    check_gradients(
        &[random(&[1, 2, 6, 4], 1), random(&[1, 1, 6, 4], 2), random(&[1, 1, 6, 4], 3)],
        attention(Some(2)),
    );
    for (window, s) in [(None, 37), (Some(5), 37), (None, 128)] {
        let inputs = [random(&[2, 4, s, 16], 4), random(&[2, 2, s, 16], 5), random(&[2, 2, s, 16], 6)];
        assert_same_as_reference(&inputs, attention(window), reference(window), 1e-12);
        assert_same_as_reference(&f32s(&inputs), attention(window), reference(window), 1e-5);
    }
}

#[test]
fn twenty_training_steps_with_fused_kernels_track_the_composed_ops() {
    // LoRA with dropout and a saved output layer runs the fused adapter op on the CPU kernels.
    let adapter: AdapterSpec = serde_json::from_value(json!({
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.1, "target_modules": LORA_TARGETS},
        "modules_to_save": ["lm_head"], "base_dtype": "f32",
    }))
    .unwrap();
    // GQA and a sliding window shorter than the sequence, so every masking path is used.
    let cases = [
        (json!({"num_key_value_heads": 1}), None),
        (json!({"sliding_window": 6}), None),
        (json!({"num_key_value_heads": 1}), Some(adapter)),
    ];
    for (extra, adapter) in cases {
        let config = common::tiny_config("MistralForCausalLM", extra.clone());
        let options = BenchOptions {
            seq_len: 24,
            batch: 4,
            steps: 18,
            warmup: 2,
            kernels: Kernels::Best,
            device: Device::Cpu,
            compute: DType::F32,
            adapter: adapter.clone(),
            autograd: false,
            recompute_every: None,
            ignore_estimate: false,
        };
        let composed = bench(&config, &BenchOptions { kernels: Kernels::Composed, ..options.clone() }).unwrap();
        // The explicit step (full training) or the whole-block CPU kernels through autograd
        // (adapters), the same kernels through autograd, and the ops that also have CUDA kernels.
        let explicit = if adapter.is_some() { "cpu" } else { "explicit" };
        let variants =
            [(Kernels::Cpu, false, explicit), (Kernels::Cpu, true, "cpu"), (Kernels::Portable, false, "portable")];
        for (kernels, autograd, label) in variants {
            let fused = bench(&config, &BenchOptions { kernels, autograd, ..options.clone() }).unwrap();
            assert_eq!(fused.kernels, label);
            assert_eq!(fused.losses.len(), 20);
            for (step, (a, b)) in fused.losses.iter().zip(&composed.losses).enumerate() {
                assert!((a - b).abs() <= 1e-4 * b.abs(), "{extra} {label}: step {step}: loss {a} vs composed {b}");
            }
            // Model FLOPs can never beat the hardware: a peak below them would be dishonest.
            assert!(fused.mfu > 0.0 && fused.mfu < 1.0, "{label}: MFU {} against {}", fused.mfu, fused.peak_source);
            let learned = if adapter.is_some() { 0.1 } else { 0.5 };
            assert!(fused.losses[19] < fused.losses[0] - learned, "it learns: {:?}", fused.losses);
        }
    }
}

/// Rotary tables for a head of `d` (θ = 10000), as the model builds them.
fn rope_tables(s: usize, d: usize, dtype: DType) -> (Tensor, Tensor) {
    let inv_freq: Vec<f64> = (0..d / 2).map(|i| 1.0 / 10000f64.powf(2.0 * i as f64 / d as f64)).collect();
    ops::rope_tables(&inv_freq, s, dtype, &Device::Cpu).unwrap()
}

#[test]
fn fused_self_attention_matches_finite_differences_and_the_composed_ops() {
    // Packed projections (b, s, (heads + 2·kv_heads)·d) → split, rotate, attend, merge.
    let reference = |heads: usize, kv_heads: usize, window: Option<usize>| {
        move |x: &[Tensor]| -> Result<Tensor> {
            let (b, s, width) = x[0].dims3()?;
            let d = width / (heads + 2 * kv_heads);
            let (cos, sin) = rope_tables(s, d, x[0].dtype());
            let split = |first: usize, n: usize| {
                x[0].narrow(2, first * d, n * d)?.reshape((b, s, n, d))?.transpose(1, 2)?.contiguous()
            };
            let q = ops::rope(&split(0, heads)?, &cos, &sin)?;
            let k = ops::rope(&split(heads, kv_heads)?, &cos, &sin)?;
            let v = split(heads + kv_heads, kv_heads)?;
            let mask = ops::causal_mask(s, window, x[0].dtype(), &Device::Cpu)?;
            ops::attention(&q, &k, &v, &mask)?.transpose(1, 2)?.reshape((b, s, heads * d))
        }
    };
    let fused = |heads: usize, kv_heads: usize, window: Option<usize>| {
        move |x: &[Tensor]| -> Result<Tensor> {
            let (_, s, width) = x[0].dims3()?;
            let (cos, sin) = rope_tables(s, width / (heads + 2 * kv_heads), x[0].dtype());
            fused::self_attention(&x[0], &cos, &sin, heads, kv_heads, window)
        }
    };
    check_gradients(&[random(&[2, 5, 8 * 6], 1)], fused(4, 2, None));
    check_gradients(&[random(&[1, 6, 3 * 4], 2)], fused(1, 1, Some(2)));
    check_gradients(&[random(&[1, 4, 6 * 2], 3)], fused(2, 2, None));
    // Sequences of one, two and several key blocks (64 positions each), not all whole; windows
    // inside one block and across blocks; one and several key/value heads.
    for (s, heads, kv_heads, window) in
        [(37, 4, 2, None), (37, 4, 2, Some(5)), (128, 2, 1, None), (150, 4, 4, None), (150, 4, 1, Some(70))]
    {
        let inputs = [random(&[2, s, (heads + 2 * kv_heads) * 16], 4)];
        let (f, r) = (fused(heads, kv_heads, window), reference(heads, kv_heads, window));
        assert_same_as_reference(&inputs, f, r, 1e-12);
        assert_same_as_reference(&f32s(&inputs), f, r, 1e-5);
    }
}

#[test]
fn fused_packed_swiglu_matches_the_two_projection_form() {
    let inputs = [(random(&[2, 3, 2 * 700], 5) * 6.0).unwrap()];
    let reference = |x: &[Tensor]| ops::swiglu(&x[0].narrow(2, 0, 700)?, &x[0].narrow(2, 700, 700)?);
    assert_same_as_reference(&inputs, |x| fused::swiglu_packed(&x[0]), reference, 1e-12);
    assert_same_as_reference(&f32s(&inputs), |x| fused::swiglu_packed(&x[0]), reference, 2e-6);
    check_gradients(&[random(&[3, 2 * 5], 6)], |x| fused::swiglu_packed(&x[0]));
}

#[test]
fn fused_output_projection_and_cross_entropy_match_the_composed_ops() {
    for (n, hidden, vocab) in [(5, 4, 10), (40, 16, 3000)] {
        let targets: Vec<u32> = (0..n).map(|i| (i * 7919 % vocab) as u32).collect();
        let targets = Tensor::new(targets.as_slice(), &Device::Cpu).unwrap();
        let inputs = [random(&[n, hidden], 1), (random(&[vocab, hidden], 2) * 3.0).unwrap()];
        let f = |x: &[Tensor]| fused::linear_nll(&x[0], &x[1], &targets);
        if vocab == 10 {
            check_gradients(&inputs, f);
        }
        let reference = |x: &[Tensor]| ops::token_nll(&ops::linear(&x[0], &x[1], None)?, &targets);
        assert_same_as_reference(&inputs, f, reference, 1e-12);
        assert_same_as_reference(&f32s(&inputs), f, reference, 2e-5);
    }
}

#[test]
fn the_kernel_check_passes_on_the_cpu_and_names_every_portable_op() {
    let checks = cpt_train::kernel_check::check_kernels(&Device::Cpu).unwrap();
    let ops: Vec<&str> = checks.iter().map(|c| c.op).collect();
    assert_eq!(ops, ["rms-norm", "swiglu", "rope", "causal-softmax", "token-nll"]);
    for check in &checks {
        assert!(check.ok && check.max_error < 1e-5, "{check:?}");
    }
}
