//! HuggingFace directories and config.json: round trips, shards, dtypes and the errors users see.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use cpt_train::config::{ConfigError, RopeScaling};
use cpt_train::hf::{self, write_model_dir, ModelFiles};
use cpt_train::params::write_safetensors;
use cpt_train::{ModelConfig, ModelDir, Params};
use serde_json::json;

fn write_tiny_dir(dir: &std::path::Path, extra: serde_json::Value, dtype: DType) -> (ModelConfig, Params) {
    let config_json = common::tiny_config_json("LlamaForCausalLM", extra);
    let config = ModelConfig::from_json(&config_json).unwrap();
    let params = common::tiny_params(&config, 7, DType::F32);
    let tokenizer = common::byte_tokenizer();
    write_model_dir(dir, ModelFiles { config_json, params: &params, dtype, tokenizer: &tokenizer, extra: vec![] })
        .unwrap();
    (config, params)
}

fn tensors_of(params: &Params) -> HashMap<String, Tensor> {
    params.iter().map(|(n, v)| (n.to_string(), v.as_tensor().copy().unwrap())).collect()
}

fn assert_same(a: &Params, b: &Params) {
    assert_eq!(a.iter().count(), b.iter().count());
    for ((na, va), (nb, vb)) in a.iter().zip(b.iter()) {
        assert_eq!(na, nb);
        let (x, y): (Vec<f32>, Vec<f32>) =
            (va.flatten_all().unwrap().to_vec1().unwrap(), vb.flatten_all().unwrap().to_vec1().unwrap());
        assert!(x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()), "`{na}` differs");
    }
}

#[test]
fn load_save_load_is_bit_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let (first, second) = (tmp.path().join("a"), tmp.path().join("b"));
    let (_, params) = write_tiny_dir(&first, json!({}), DType::F32);
    let loaded = ModelDir::open(&first).unwrap().load_params(DType::F32, &Device::Cpu).unwrap();
    assert_same(&params, &loaded);
    hf::export(&first, &second, DType::F32).unwrap();
    let reloaded = ModelDir::open(&second).unwrap().load_params(DType::F32, &Device::Cpu).unwrap();
    assert_same(&loaded, &reloaded);
    assert_eq!(
        std::fs::read(first.join("model.safetensors")).unwrap(),
        std::fs::read(second.join("model.safetensors")).unwrap(),
        "the same weights must serialise to the same bytes"
    );
}

#[test]
fn sharded_checkpoints_load_like_single_files() {
    let tmp = tempfile::tempdir().unwrap();
    let (single, sharded) = (tmp.path().join("single"), tmp.path().join("sharded"));
    let (_, params) = write_tiny_dir(&single, json!({}), DType::F32);
    std::fs::create_dir(&sharded).unwrap();
    for file in ["config.json", "tokenizer.json"] {
        std::fs::copy(single.join(file), sharded.join(file)).unwrap();
    }
    let mut shards: [Vec<(String, Tensor)>; 2] = [vec![], vec![]];
    let mut weight_map = serde_json::Map::new();
    for (i, (name, tensor)) in tensors_of(&params).into_iter().enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", i % 2 + 1);
        weight_map.insert(name.clone(), file.into());
        shards[i % 2].push((name, tensor));
    }
    for (i, shard) in shards.iter().enumerate() {
        write_safetensors(&sharded.join(format!("model-{:05}-of-00002.safetensors", i + 1)), shard).unwrap();
    }
    let index = json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(sharded.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let loaded = ModelDir::open(&sharded).unwrap().load_params(DType::F32, &Device::Cpu).unwrap();
    assert_same(&params, &loaded);
}

#[test]
fn bf16_and_f16_weights_load_into_f32_exactly() {
    for dtype in [DType::BF16, DType::F16] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("m");
        let (_, params) = write_tiny_dir(&dir, json!({}), dtype);
        let loaded = ModelDir::open(&dir).unwrap().load_params(DType::F32, &Device::Cpu).unwrap();
        for ((name, original), (_, loaded)) in params.iter().zip(loaded.iter()) {
            let rounded = original.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
            let diff: f32 =
                (rounded - loaded.as_tensor()).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
            assert_eq!(diff, 0.0, "{dtype:?} `{name}`");
        }
    }
}

#[test]
fn a_missing_or_unexpected_tensor_is_an_error_naming_it() {
    let config = common::tiny_config("LlamaForCausalLM", json!({}));
    let params = common::tiny_params(&config, 1, DType::F32);
    let mut tensors = tensors_of(&params);
    tensors.remove("model.layers.1.mlp.up_proj.weight");
    tensors.insert("model.layers.1.mlp.extra.weight".into(), Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap());
    let error = Params::from_tensors(&config, tensors, DType::F32).err().expect("must fail").to_string();
    assert!(error.contains("model.layers.1.mlp.up_proj.weight"), "{error}");
    assert!(error.contains("model.layers.1.mlp.extra.weight"), "{error}");
}

#[test]
fn a_wrongly_shaped_tensor_is_an_error_naming_it() {
    let config = common::tiny_config("LlamaForCausalLM", json!({}));
    let params = common::tiny_params(&config, 1, DType::F32);
    let mut tensors = tensors_of(&params);
    tensors.insert("model.norm.weight".into(), Tensor::zeros(31, DType::F32, &Device::Cpu).unwrap());
    let error = Params::from_tensors(&config, tensors, DType::F32).err().expect("must fail").to_string();
    assert!(error.contains("model.norm.weight") && error.contains("[31]"), "{error}");
}

#[test]
fn a_missing_weights_file_names_the_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    write_tiny_dir(&dir, json!({}), DType::F32);
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let error = format!("{:#}", ModelDir::open(&dir).unwrap().load_params(DType::F32, &Device::Cpu).err().unwrap());
    assert!(error.contains("model.safetensors") && error.contains(&dir.display().to_string()), "{error}");
}

#[test]
fn writing_over_an_existing_directory_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    write_tiny_dir(&dir, json!({}), DType::F32);
    let error = hf::export(&dir, &dir, DType::F32).err().unwrap().to_string();
    assert!(error.contains("already exists"), "{error}");
    assert!(dir.join("model.safetensors").exists());
}

#[test]
fn config_errors_name_the_architecture_or_field() {
    let cases = [
        (json!({"architectures": ["GPT2LMHeadModel"]}), "GPT2LMHeadModel"),
        (json!({"hidden_size": null}), "hidden_size"),
        (json!({"hidden_act": "gelu"}), "hidden_act"),
        (json!({"num_key_value_heads": 3}), "num_key_value_heads"),
        (json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}), "rope_scaling.rope_type"),
        (json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}), "rope_scaling.low_freq_factor"),
        (json!({"mlp_bias": true}), "mlp_bias"),
    ];
    for (extra, needle) in cases {
        let json = common::tiny_config_json("LlamaForCausalLM", extra.clone());
        let error = ModelConfig::from_json(&json).err().unwrap_or_else(|| panic!("{extra} must be refused"));
        assert!(error.to_string().contains(needle), "{extra}: {error}");
    }
    let qwen = common::tiny_config_json("Qwen2ForCausalLM", json!({"use_sliding_window": true}));
    assert!(
        matches!(ModelConfig::from_json(&qwen), Err(ConfigError::Field { field, .. }) if field == "use_sliding_window")
    );
}

#[test]
fn config_fields_are_read_for_each_architecture() {
    let llama = common::tiny_config(
        "LlamaForCausalLM",
        json!({"head_dim": 16, "eos_token_id": [5, 6], "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}),
    );
    assert_eq!((llama.head_dim, llama.eos_token_ids.clone(), llama.qkv_bias), (16, vec![5, 6], false));
    assert!(matches!(llama.rope_scaling, Some(RopeScaling::Llama3 { .. })));
    let qwen = common::tiny_config("Qwen2ForCausalLM", json!({}));
    assert!(qwen.qkv_bias && !qwen.o_bias && qwen.head_dim == 8 && qwen.kv_groups() == 2);
    let mistral = common::tiny_config("MistralForCausalLM", json!({"sliding_window": 4096}));
    assert_eq!(mistral.sliding_window, Some(4096));
    // transformers 5 nests theta and scaling in rope_parameters.
    let v5 = common::tiny_config(
        "LlamaForCausalLM",
        json!({"rope_theta": null, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}}),
    );
    assert_eq!((v5.rope_theta, v5.rope_scaling.clone()), (5e5, Some(RopeScaling::Linear { factor: 2.0 })));
    // Our own config.json round-trips.
    for config in [llama, qwen, mistral, v5] {
        assert_eq!(ModelConfig::from_json(&config.to_hf_json()).unwrap(), config);
    }
}

#[test]
fn llama3_rope_scaling_matches_hand_computed_frequencies() {
    // Llama 3.1 8B: head_dim 128, theta 5e5, factor 8, low 1, high 4, original context 8192.
    let config = common::tiny_config(
        "LlamaForCausalLM",
        json!({"hidden_size": 128, "num_attention_heads": 1, "num_key_value_heads": 1, "rope_theta": 500000.0,
               "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192}}),
    );
    let scaled = config.rope_inv_freq();
    let plain = |i: usize| 1.0 / 500000f64.powf(2.0 * i as f64 / 128.0);
    // High frequency (wavelength 2π < 8192/4): unchanged.
    assert_eq!(scaled[0], plain(0));
    // Low frequency (wavelength > 8192): divided by the factor.
    assert!((scaled[63] - plain(63) / 8.0).abs() < 1e-18);
    // In between: a blend. Index 32 has wavelength 2π·5e5^(64/128) ≈ 4443 ∈ [2048, 8192].
    let wavelen = 2.0 * std::f64::consts::PI / plain(32);
    let smooth = (8192.0 / wavelen - 1.0) / (4.0 - 1.0);
    let expected = (1.0 - smooth) * plain(32) / 8.0 + smooth * plain(32);
    assert!((2048.0..8192.0).contains(&wavelen) && (scaled[32] - expected).abs() < 1e-15);
}

#[test]
fn init_is_reproducible_from_its_seed() {
    let config = common::tiny_config("LlamaForCausalLM", json!({}));
    assert_same(&common::tiny_params(&config, 5, DType::F32), &common::tiny_params(&config, 5, DType::F32));
    let (a, b) = (common::tiny_params(&config, 5, DType::F32), common::tiny_params(&config, 6, DType::F32));
    let differs = a.iter().zip(b.iter()).any(|((_, x), (_, y))| {
        (x.as_tensor() - y.as_tensor()).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0
    });
    assert!(differs);
}
