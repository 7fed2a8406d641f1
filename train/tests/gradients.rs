//! Every op of the model against central finite differences in f64, and the whole model's backward
//! pass reaching every parameter.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{check_gradients, random};
use cpt_protocol::adapter::{AdapterSpec, LORA_TARGETS};
use cpt_train::adapter;
use cpt_train::model::{ops, Kernels};
use cpt_train::Llama;
use serde_json::json;

#[test]
fn rms_norm_gradient_matches_finite_differences() {
    check_gradients(&[random(&[3, 5, 8], 1), random(&[8], 2)], |x| ops::rms_norm(&x[0], &x[1], 1e-5));
}

#[test]
fn linear_with_bias_gradient_matches_finite_differences() {
    check_gradients(&[random(&[2, 3, 6], 1), random(&[4, 6], 2), random(&[4], 3)], |x| {
        ops::linear(&x[0], &x[1], Some(&x[2]))
    });
}

#[test]
fn rope_gradient_matches_finite_differences() {
    let config = common::tiny_config("LlamaForCausalLM", json!({}));
    let (cos, sin) = ops::rope_tables(&config.rope_inv_freq(), 5, DType::F64, &Device::Cpu).unwrap();
    check_gradients(&[random(&[2, 3, 5, 8], 1)], |x| ops::rope(&x[0], &cos, &sin));
}

#[test]
fn causal_grouped_query_attention_gradient_matches_finite_differences() {
    let mask = ops::causal_mask(5, None, DType::F64, &Device::Cpu).unwrap();
    // 4 query heads share 2 key/value heads.
    check_gradients(&[random(&[2, 4, 5, 6], 1), random(&[2, 2, 5, 6], 2), random(&[2, 2, 5, 6], 3)], |x| {
        ops::attention(&x[0], &x[1], &x[2], &mask)
    });
}

#[test]
fn sliding_window_attention_gradient_matches_finite_differences() {
    let mask = ops::causal_mask(6, Some(2), DType::F64, &Device::Cpu).unwrap();
    check_gradients(&[random(&[1, 2, 6, 4], 1), random(&[1, 1, 6, 4], 2), random(&[1, 1, 6, 4], 3)], |x| {
        ops::attention(&x[0], &x[1], &x[2], &mask)
    });
}

#[test]
fn attention_never_looks_at_future_or_out_of_window_tokens() {
    let (q, k, v) = (random(&[1, 2, 6, 4], 1), random(&[1, 1, 6, 4], 2), random(&[1, 1, 6, 4], 3));
    for window in [None, Some(2)] {
        let mask = ops::causal_mask(6, window, DType::F64, &Device::Cpu).unwrap();
        let before: Vec<f64> = ops::attention(&q, &k, &v, &mask).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        // Changing the last key and value may only change the last position's output.
        let k2 = Tensor::cat(&[k.narrow(2, 0, 5).unwrap(), random(&[1, 1, 1, 4], 7)], 2).unwrap();
        let v2 = Tensor::cat(&[v.narrow(2, 0, 5).unwrap(), random(&[1, 1, 1, 4], 8)], 2).unwrap();
        let after: Vec<f64> = ops::attention(&q, &k2, &v2, &mask).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        for (i, (a, b)) in before.iter().zip(&after).enumerate() {
            let position = (i / 4) % 6;
            if position < 5 {
                assert_eq!(a, b, "position {position} saw the future (window {window:?})");
            } else {
                assert_ne!(a, b, "the last position ignored its own key (window {window:?})");
            }
        }
    }
}

#[test]
fn swiglu_gradient_matches_finite_differences() {
    check_gradients(&[random(&[3, 7], 1), random(&[3, 7], 2)], |x| ops::swiglu(&x[0], &x[1]));
}

#[test]
fn cross_entropy_gradient_matches_finite_differences() {
    let targets = Tensor::new(&[3u32, 0, 9, 4, 4], &Device::Cpu).unwrap();
    check_gradients(&[(random(&[5, 10], 1) * 4.0).unwrap()], |x| ops::cross_entropy(&x[0], &targets));
}

#[test]
fn cross_entropy_equals_hand_computed_value() {
    // logits [0, ln 3] → p = [1/4, 3/4]; targets pick 3/4 then 1/4.
    let logits = Tensor::new(&[[0.0f64, 3f64.ln()], [0.0, 3f64.ln()]], &Device::Cpu).unwrap();
    let targets = Tensor::new(&[1u32, 0], &Device::Cpu).unwrap();
    let loss: f64 = ops::cross_entropy(&logits, &targets).unwrap().to_scalar().unwrap();
    let expected = -((0.75f64).ln() + (0.25f64).ln()) / 2.0;
    assert!((loss - expected).abs() < 1e-12, "{loss} vs {expected}");
}

#[test]
fn whole_model_gradient_matches_finite_differences() {
    for architecture in ["LlamaForCausalLM", "Qwen2ForCausalLM"] {
        let config =
            common::tiny_config(architecture, json!({"hidden_size": 16, "intermediate_size": 24, "vocab_size": 20}));
        let params = common::tiny_params(&config, 3, DType::F64);
        let ids = Tensor::new(&[[1u32, 5, 7, 2, 19, 3]], &Device::Cpu).unwrap();
        let loss_of = |params: &cpt_train::Params| -> f64 {
            Llama::new(&config, params).unwrap().loss(&ids).unwrap().to_scalar().unwrap()
        };
        let grads = Llama::new(&config, &params).unwrap().loss(&ids).unwrap().backward().unwrap();
        common::check_parameter_gradients(&params, &grads, loss_of, architecture);
    }
}

#[test]
fn every_trainable_tensor_receives_a_gradient_in_one_backward_pass() {
    let cases = [
        ("LlamaForCausalLM", json!({})),
        ("LlamaForCausalLM", json!({"tie_word_embeddings": true, "attention_bias": true})),
        ("MistralForCausalLM", json!({"sliding_window": 3})),
        ("Qwen2ForCausalLM", json!({})),
    ];
    for (architecture, extra) in cases {
        let config = common::tiny_config(architecture, extra.clone());
        let params = common::tiny_params(&config, 1, DType::F32);
        let ids = Tensor::new(&[[1u32, 5, 7, 2, 9, 3, 4, 8], [8, 4, 3, 9, 2, 7, 5, 1]], &Device::Cpu).unwrap();
        let grads = Llama::new(&config, &params).unwrap().loss(&ids).unwrap().backward().unwrap();
        for (name, var) in params.iter() {
            let grad = grads.get(var).unwrap_or_else(|| panic!("{architecture} {extra}: `{name}` got no gradient"));
            let norm: f32 = grad.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
            assert!(norm > 0.0 && norm.is_finite(), "{architecture} {extra}: `{name}` gradient norm {norm}");
        }
    }
}

#[test]
fn masked_loss_equals_the_loss_of_the_unpadded_prefix() {
    let config = common::tiny_config("LlamaForCausalLM", json!({}));
    let params = common::tiny_params(&config, 2, DType::F64);
    let model = Llama::new(&config, &params).unwrap();
    let ids = Tensor::new(&[[3u32, 9, 4, 7, 1, 0, 0, 0]], &Device::Cpu).unwrap();
    // 5 real tokens: targets at positions 0..4 count, the 3 padding targets do not.
    let mask = Tensor::new(&[[1f64, 1., 1., 1., 0., 0., 0.]], &Device::Cpu).unwrap();
    let masked: f64 = model.masked_loss(&ids, &mask).unwrap().to_scalar().unwrap();
    let prefix: f64 = model.loss(&ids.narrow(1, 0, 5).unwrap()).unwrap().to_scalar().unwrap();
    assert!((masked - prefix).abs() < 1e-12, "{masked} vs {prefix}");
}

/// An adapter job's parameters over `config` in f64: the base frozen except `saved`, LoRA factors on
/// every projection, both random (B too, so the adapters are not a no-op).
fn adapter_params(config: &cpt_train::ModelConfig, saved: &[&str]) -> (cpt_train::Params, AdapterSpec) {
    let adapter: AdapterSpec = serde_json::from_value(json!({
        "lora": {"rank": 3, "alpha": 6.0, "dropout": 0.25, "target_modules": LORA_TARGETS},
        "modules_to_save": saved,
    }))
    .unwrap();
    let base = common::tiny_params(config, 3, DType::F64);
    let tensors = base.iter().map(|(n, v)| (n.to_string(), v.as_tensor().copy().unwrap())).collect();
    let frozen = |name: &str| (!adapter::is_saved(config, &adapter, name)).then_some(DType::F64);
    let mut params = cpt_train::Params::from_tensors_freezing(config, tensors, DType::F64, frozen).unwrap();
    for (i, (name, shape)) in adapter::lora_tensors(config, &adapter).into_iter().enumerate() {
        params.insert_trained(name, &(common::random(&shape, 50 + i as u64) * 0.3).unwrap()).unwrap();
    }
    (params, adapter)
}

#[test]
fn adapter_gradients_match_finite_differences_and_frozen_weights_get_none() {
    let config =
        common::tiny_config("LlamaForCausalLM", json!({"hidden_size": 16, "intermediate_size": 24, "vocab_size": 20}));
    let ids = Tensor::new(&[[1u32, 5, 7, 2, 19, 3]], &Device::Cpu).unwrap();
    for kernels in [Kernels::Cpu, Kernels::Composed] {
        let (params, adapter) = adapter_params(&config, &["lm_head"]);
        let model = |params: &cpt_train::Params| {
            let mut model = Llama::new(&config, params).unwrap();
            model.set_kernels(kernels);
            model.set_lora(adapter::settings(&adapter));
            // The same masks in every forward pass, so the loss is a function of the weights.
            model.set_dropout_pass(Some(7));
            model
        };
        let loss_of = |params: &cpt_train::Params| -> f64 { model(params).loss(&ids).unwrap().to_scalar().unwrap() };
        let grads = model(&params).loss(&ids).unwrap().backward().unwrap();
        assert_eq!(params.iter().count(), 2 * 7 * 2 + 1, "LoRA A and B on 7 projections × 2 layers, and lm_head");
        common::check_parameter_gradients(&params, &grads, loss_of, &kernels.to_string());
        if kernels == Kernels::Cpu {
            // The fused kernels compute no gradient for a frozen matrix.
            for frozen in [
                "model.layers.0.mlp.down_proj.weight",
                "model.layers.1.self_attn.o_proj.weight",
                "model.embed_tokens.weight",
            ] {
                assert!(grads.get(&params.tensor(frozen).unwrap()).is_none(), "{frozen} got a gradient");
            }
            for packed in ["model.layers.0.self_attn.qkv_proj.weight", "model.layers.1.mlp.gate_up_proj.weight"] {
                assert!(grads.get(&params.packed(packed).unwrap()).is_none(), "{packed} got a gradient");
            }
        }
    }
}

#[test]
fn dropout_changes_the_adapted_loss_only_while_training() {
    let config = common::tiny_config("LlamaForCausalLM", json!({}));
    let (params, adapter) = adapter_params(&config, &[]);
    let ids = Tensor::new(&[[1u32, 5, 7, 2, 19, 3, 8, 9]], &Device::Cpu).unwrap();
    let mut model = Llama::new(&config, &params).unwrap();
    model.set_kernels(Kernels::Cpu);
    model.set_lora(adapter::settings(&adapter));
    let loss = |m: &Llama| -> f64 { m.loss(&ids).unwrap().to_scalar().unwrap() };
    let evaluation = loss(&model);
    model.set_dropout_pass(Some(1));
    let (first, again) = (loss(&model), loss(&model));
    model.set_dropout_pass(Some(2));
    let other = loss(&model);
    assert_eq!(first, again, "one pass seed, one mask");
    assert_ne!(first, other, "another pass seed, another mask");
    assert_ne!(first, evaluation);
    assert_eq!(loss(&model.detached()), evaluation, "a detached (evaluation) model applies no dropout");
    // The fused adapter op and the composed ops draw the same masks and compute the same loss.
    model.set_dropout_pass(Some(1));
    model.set_kernels(Kernels::Composed);
    let composed = loss(&model);
    assert!((composed - first).abs() < 1e-12 * first.abs(), "{composed} vs {first}");
}
