//! Small models and tokenizers shared by the integration tests.
#![allow(dead_code)]

pub mod runs;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor, Var};
use cpt_train::{ModelConfig, Params};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokenizers::Tokenizer;

/// A HF config.json for a tiny model; `extra` fields override the defaults.
pub fn tiny_config_json(architecture: &str, extra: Value) -> Value {
    let mut config = json!({
        "architectures": [architecture],
        "vocab_size": 300,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 64,
        "tie_word_embeddings": false,
        "bos_token_id": 256,
        "eos_token_id": 256,
    });
    for (k, v) in extra.as_object().expect("extra is an object") {
        config[k] = v.clone();
    }
    config
}

pub fn tiny_config(architecture: &str, extra: Value) -> ModelConfig {
    ModelConfig::from_json(&tiny_config_json(architecture, extra)).expect("tiny config is valid")
}

pub fn tiny_params(config: &ModelConfig, seed: u64, dtype: DType) -> Params {
    Params::init_random(config, seed, dtype, &Device::Cpu).expect("init")
}

/// A byte-level tokenizer with no merges: one token per byte, plus `<|endoftext|>` as id 256.
pub fn byte_tokenizer() -> Tokenizer {
    let mut vocab = serde_json::Map::new();
    for (id, ch) in tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet()
        .into_iter()
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .enumerate()
    {
        vocab.insert(ch.to_string(), id.into());
    }
    vocab.insert("<|endoftext|>".into(), 256.into());
    let json = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": 256, "content": "<|endoftext|>", "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []},
    });
    json.to_string().parse().expect("byte tokenizer loads")
}

/// A tensor of uniform values in [−1, 1) (f64).
pub fn random(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let values: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

/// Compares the analytic gradient of `sum(f(inputs) · projection)` with central differences for
/// every element of every input.
pub fn check_gradients(inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Result<Tensor>) {
    let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let output = f(&tensors).unwrap();
    let projection = random(output.dims(), 99);
    let scalar =
        |xs: &[Tensor]| -> f64 { (f(xs).unwrap() * &projection).unwrap().sum_all().unwrap().to_scalar().unwrap() };
    let grads = (output * &projection).unwrap().sum_all().unwrap().backward().unwrap();
    let eps = 1e-6;
    for (i, var) in vars.iter().enumerate() {
        let analytic: Vec<f64> =
            grads.get(var).expect("input has a gradient").flatten_all().unwrap().to_vec1().unwrap();
        let base: Vec<f64> = inputs[i].flatten_all().unwrap().to_vec1().unwrap();
        for (j, &a) in analytic.iter().enumerate() {
            let nudged = |delta: f64| {
                let mut values = base.clone();
                values[j] += delta;
                let mut xs = inputs.to_vec();
                xs[i] = Tensor::from_vec(values, inputs[i].dims(), &Device::Cpu).unwrap();
                scalar(&xs)
            };
            let numeric = (nudged(eps) - nudged(-eps)) / (2.0 * eps);
            let tolerance = 1e-6 * (1.0 + numeric.abs());
            assert!((a - numeric).abs() < tolerance, "input {i} element {j}: analytic {a} vs numeric {numeric}");
        }
    }
}

/// Compares the gradient of every trained parameter in `grads` with central differences of
/// `loss_of(params)` (f64) at three elements per tensor: cheap, and it touches every parameter.
/// `label` names the case in failures.
pub fn check_parameter_gradients(params: &Params, grads: &GradStore, loss_of: impl Fn(&Params) -> f64, label: &str) {
    let eps = 1e-6;
    for (name, var) in params.iter() {
        let analytic: Vec<f64> = grads.get(var).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let original = var.as_tensor().copy().unwrap();
        let values: Vec<f64> = original.flatten_all().unwrap().to_vec1().unwrap();
        for j in [0, values.len() / 2, values.len() - 1] {
            let at = |delta: f64| {
                let mut v = values.clone();
                v[j] += delta;
                var.set(&Tensor::from_vec(v, original.dims(), &Device::Cpu).unwrap()).unwrap();
                loss_of(params)
            };
            let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
            var.set(&original).unwrap();
            let tolerance = 1e-6 * (1.0 + numeric.abs());
            assert!((analytic[j] - numeric).abs() < tolerance, "{label} {name}[{j}]: {} vs {numeric}", analytic[j]);
        }
    }
}
