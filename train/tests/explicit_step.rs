//! The explicit training step against its reference, the composed autograd model: every
//! parameter's gradient in f64 (with and without recomputation, across the architectures' variants),
//! against finite differences at a few elements, and 20 optimizer steps of loss in f32.

mod common;

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use common::{tiny_config, tiny_params};
use cpt_train::model::Kernels;
use cpt_train::optim::{AdamW, AdamWConfig};
use cpt_train::step::{self, Gradients};
use cpt_train::{Llama, ModelConfig, Params};
use rand::{Rng, SeedableRng};
use serde_json::json;

fn random_ids(config: &ModelConfig, (batch, width): (usize, usize), seed: u64) -> Tensor {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let ids: Vec<u32> = (0..batch * width).map(|_| rng.random_range(0..config.vocab_size as u32)).collect();
    Tensor::from_vec(ids, (batch, width), &Device::Cpu).unwrap()
}

/// The explicit step's gradients of one micro-batch.
fn explicit_gradients(
    config: &ModelConfig,
    params: &Params,
    ids: &Tensor,
    mask: Option<&Tensor>,
    recompute: Option<usize>,
) -> (f64, BTreeMap<String, Tensor>) {
    let mut grads = Gradients::<f64>::default();
    let loss = step::accumulate(config, params, ids, mask, 1.0, recompute, &mut grads).unwrap();
    (loss, grads.into_tensors(params).unwrap())
}

fn composed_loss(config: &ModelConfig, params: &Params, ids: &Tensor, mask: Option<&Tensor>) -> Tensor {
    let mut model = Llama::new(config, params).unwrap();
    model.set_kernels(Kernels::Composed);
    match mask {
        Some(mask) => model.masked_loss(ids, mask).unwrap(),
        None => model.loss(ids).unwrap(),
    }
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap()
}

/// The explicit step's loss to 1e-12 and every gradient to 1e-10 of the composed model's
/// `reference` loss, whose backward pass gave `store`.
fn assert_matches(
    reference: &Tensor,
    store: &GradStore,
    params: &Params,
    explicit: (f64, BTreeMap<String, Tensor>),
    label: &str,
) {
    let (loss, grads) = explicit;
    let expected = reference.to_scalar::<f64>().unwrap();
    assert!((loss - expected).abs() < 1e-12 * expected.abs(), "{label}: loss {loss} vs {expected}");
    for (name, var) in params.iter() {
        let want = store.get(var).unwrap();
        let error = max_abs(&(&grads[name] - want).unwrap());
        assert!(error <= 1e-10 * (1.0 + max_abs(want)), "{label} `{name}`: off by {error}");
    }
}

#[test]
fn gradients_match_the_composed_model_in_every_variant() {
    let variants = [
        ("LlamaForCausalLM", json!({})),
        ("LlamaForCausalLM", json!({"tie_word_embeddings": true, "attention_bias": true, "num_hidden_layers": 3})),
        ("MistralForCausalLM", json!({"sliding_window": 3})),
        ("Qwen2ForCausalLM", json!({})),
    ];
    for (architecture, extra) in variants {
        let config = tiny_config(architecture, extra.clone());
        let params = tiny_params(&config, 7, DType::F64);
        let ids = random_ids(&config, (2, 9), 3);
        // The second row's last three targets are padding.
        let mask: Vec<f64> = (0..16).map(|i| if i >= 13 { 0.0 } else { 1.0 }).collect();
        let mask = Tensor::from_vec(mask, (2, 8), &Device::Cpu).unwrap();
        for mask in [None, Some(&mask)] {
            let reference = composed_loss(&config, &params, &ids, mask);
            let store = reference.backward().unwrap();
            for recompute in [None, Some(1), Some(2)] {
                let label = format!("{architecture} {extra} mask {} recompute {recompute:?}", mask.is_some());
                let explicit = explicit_gradients(&config, &params, &ids, mask, recompute);
                assert_matches(&reference, &store, &params, explicit, &label);
            }
        }
    }
}

#[test]
fn a_large_vocabulary_takes_its_logits_in_chunks_with_the_same_gradients() {
    // Chunks of 2²² logits, but at least 64 rows: 64 rows of this vocabulary, so 80 rows take two.
    let config = tiny_config("LlamaForCausalLM", json!({"vocab_size": 131072, "num_hidden_layers": 1}));
    let params = tiny_params(&config, 3, DType::F64);
    let ids = random_ids(&config, (2, 41), 9);
    let mask: Vec<f64> = (0..80).map(|i| if i % 7 == 3 { 0.0 } else { 1.0 }).collect();
    let mask = Tensor::from_vec(mask, (2, 40), &Device::Cpu).unwrap();
    let reference = composed_loss(&config, &params, &ids, Some(&mask));
    let store = reference.backward().unwrap();
    let explicit = explicit_gradients(&config, &params, &ids, Some(&mask), None);
    assert_matches(&reference, &store, &params, explicit, "vocabulary 131072");
}

#[test]
fn gradients_match_finite_differences() {
    let config = tiny_config("Qwen2ForCausalLM", json!({"num_hidden_layers": 2}));
    let params = tiny_params(&config, 11, DType::F64);
    let ids = random_ids(&config, (1, 7), 5);
    let (_, grads) = explicit_gradients(&config, &params, &ids, None, Some(1));
    let loss_of = |params: &Params| composed_loss(&config, params, &ids, None).to_scalar::<f64>().unwrap();
    let eps = 1e-6;
    for (name, var) in params.iter() {
        let original = var.as_tensor().copy().unwrap();
        let values: Vec<f64> = original.flatten_all().unwrap().to_vec1().unwrap();
        let analytic: Vec<f64> = grads[name].flatten_all().unwrap().to_vec1().unwrap();
        for j in [0, values.len() / 3, values.len() - 1] {
            let at = |delta: f64| {
                let mut v = values.clone();
                v[j] += delta;
                var.set(&Tensor::from_vec(v, original.dims(), &Device::Cpu).unwrap()).unwrap();
                loss_of(&params)
            };
            let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
            var.set(&original).unwrap();
            assert!(
                (analytic[j] - numeric).abs() < 1e-6 * (1.0 + numeric.abs()),
                "{name}[{j}]: {} vs {numeric}",
                analytic[j]
            );
        }
    }
}

/// Losses of `steps` AdamW steps of two micro-batches each, through the explicit step or autograd.
fn train_losses(explicit: bool, recompute: Option<usize>, steps: usize) -> Vec<f64> {
    let config = tiny_config("LlamaForCausalLM", json!({"num_hidden_layers": 3}));
    let params = tiny_params(&config, 1, DType::F32);
    let adamw = AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
    let mut optimizer = AdamW::new(&params, adamw).unwrap();
    let mut model = Llama::new(&config, &params).unwrap();
    model.set_kernels(Kernels::Composed);
    let mut losses = Vec::new();
    for _ in 0..steps {
        let (mut loss, mut grads) = (0.0, BTreeMap::<String, Tensor>::new());
        let mut explicit_grads = Gradients::<f32>::default();
        for micro in 0..2 {
            // Two fixed batches: learnable, so the losses move.
            let ids = random_ids(&config, (2, 17), micro as u64);
            if explicit {
                loss +=
                    step::accumulate(&config, &params, &ids, None, 0.5, recompute, &mut explicit_grads).unwrap() / 2.0;
                continue;
            }
            let micro_loss = model.loss(&ids).unwrap();
            loss += micro_loss.to_scalar::<f32>().unwrap() as f64 / 2.0;
            let store = (micro_loss / 2.0).unwrap().backward().unwrap();
            for (name, var) in params.iter() {
                let grad = store.get(var).unwrap().clone();
                let summed = match grads.remove(name) {
                    Some(previous) => (previous + grad).unwrap(),
                    None => grad,
                };
                grads.insert(name.to_string(), summed);
            }
        }
        if explicit {
            grads = explicit_grads.into_tensors(&params).unwrap();
        }
        optimizer.step(&params, &grads, 1.0, |_| 3e-3).unwrap();
        losses.push(loss);
    }
    losses
}

#[test]
fn twenty_steps_follow_the_composed_model_within_1e_4() {
    let reference = train_losses(false, None, 20);
    assert!(reference[19] < reference[0] - 0.1, "the reference did not learn: {reference:?}");
    for recompute in [None, Some(2)] {
        let explicit = train_losses(true, recompute, 20);
        for (step, (a, b)) in explicit.iter().zip(&reference).enumerate() {
            assert!((a - b).abs() <= 1e-4 * b.abs(), "step {step} (recompute {recompute:?}): {a} vs {b}");
        }
    }
}
