//! GGUF import on files written the way llama.cpp writes them: permuted q/k rows, tied or separate
//! output, byte-level BPE and SentencePiece tokenizers in metadata.

mod common;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use cpt_train::gguf::{import, permute_rows, unpermute_rows};
use cpt_train::{ModelConfig, ModelDir, Params};
use serde_json::json;

fn llama_cpp_name(hf: &str) -> String {
    let fixed = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = fixed.iter().find(|(h, _)| *h == hf) {
        return g.to_string();
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (layer, rest) = rest.split_once('.').unwrap();
    let parts = [
        ("input_layernorm.weight", "attn_norm.weight"),
        ("post_attention_layernorm.weight", "ffn_norm.weight"),
        ("self_attn.q_proj.weight", "attn_q.weight"),
        ("self_attn.k_proj.weight", "attn_k.weight"),
        ("self_attn.v_proj.weight", "attn_v.weight"),
        ("self_attn.o_proj.weight", "attn_output.weight"),
        ("mlp.gate_proj.weight", "ffn_gate.weight"),
        ("mlp.up_proj.weight", "ffn_up.weight"),
        ("mlp.down_proj.weight", "ffn_down.weight"),
    ];
    let (_, g) = parts.iter().find(|(h, _)| *h == rest).unwrap();
    format!("blk.{layer}.{g}")
}

fn strings(items: &[&str]) -> Value {
    Value::Array(items.iter().map(|s| Value::String(s.to_string())).collect())
}

/// Writes `params` as llama.cpp would, quantizing matrices to `matrix_type`.
fn write_gguf(
    path: &std::path::Path,
    config: &ModelConfig,
    params: &Params,
    matrix_type: GgmlDType,
    tokenizer: Vec<(&str, Value)>,
) {
    let mut metadata = vec![
        ("general.architecture", Value::String("llama".into())),
        ("general.name", Value::String("tiny".into())),
        ("llama.block_count", Value::U32(config.num_hidden_layers as u32)),
        ("llama.context_length", Value::U32(config.max_position_embeddings as u32)),
        ("llama.embedding_length", Value::U32(config.hidden_size as u32)),
        ("llama.feed_forward_length", Value::U32(config.intermediate_size as u32)),
        ("llama.attention.head_count", Value::U32(config.num_attention_heads as u32)),
        ("llama.attention.head_count_kv", Value::U32(config.num_key_value_heads as u32)),
        ("llama.rope.freq_base", Value::F32(config.rope_theta as f32)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(config.rms_norm_eps as f32)),
        ("llama.vocab_size", Value::U32(config.vocab_size as u32)),
    ];
    metadata.extend(tokenizer);
    let tensors: Vec<(String, QTensor)> = params
        .iter()
        .map(|(name, var)| {
            let mut t = var.as_tensor().clone();
            if name.ends_with("q_proj.weight") {
                t = permute_rows(&t, config.num_attention_heads).unwrap();
            } else if name.ends_with("k_proj.weight") {
                t = permute_rows(&t, config.num_key_value_heads).unwrap();
            }
            let dtype = if t.rank() == 1 { GgmlDType::F32 } else { matrix_type };
            (llama_cpp_name(name), QTensor::quantize(&t, dtype).unwrap())
        })
        .collect();
    let metadata_refs: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut file, &metadata_refs, &tensor_refs).unwrap();
}

/// A byte-level BPE vocabulary of single characters plus "he", "ll" and "hell".
fn bpe_metadata(vocab_size: usize) -> Vec<(&'static str, Value)> {
    let mut tokens: Vec<String> = vec!["<|endoftext|>".into()];
    tokens.extend(('a'..='z').map(|c| c.to_string()));
    tokens.extend(["Ġ", "he", "ll", "hell"].map(String::from));
    while tokens.len() < vocab_size {
        tokens.push(format!("<pad{}>", tokens.len()));
    }
    let types: Vec<Value> = (0..tokens.len()).map(|i| Value::I32(if i == 0 { 3 } else { 1 })).collect();
    vec![
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("smollm".into())),
        ("tokenizer.ggml.tokens", Value::Array(tokens.into_iter().map(Value::String).collect())),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        ("tokenizer.ggml.merges", strings(&["h e", "l l", "he ll"])),
        ("tokenizer.ggml.bos_token_id", Value::U32(0)),
        ("tokenizer.ggml.eos_token_id", Value::U32(0)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
    ]
}

fn load(dir: &std::path::Path) -> (ModelDir, Params) {
    let model = ModelDir::open(dir).unwrap();
    let params = model.load_params(DType::F32, &Device::Cpu).unwrap();
    (model, params)
}

#[test]
fn permute_and_unpermute_rows_are_inverse_and_not_identity() {
    let t = Tensor::arange(0f32, 96.0, &Device::Cpu).unwrap().reshape((16, 6)).unwrap();
    let p = permute_rows(&t, 2).unwrap();
    assert_ne!(p.to_vec2::<f32>().unwrap(), t.to_vec2::<f32>().unwrap());
    assert_eq!(unpermute_rows(&p, 2).unwrap().to_vec2::<f32>().unwrap(), t.to_vec2::<f32>().unwrap());
    // Row order within a head of dim 8 becomes 0,4,1,5,2,6,3,7: RoPE pairs made adjacent.
    let rows: Vec<f32> = p.narrow(1, 0, 1).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(&rows[..8], &[0.0, 24.0, 6.0, 30.0, 12.0, 36.0, 18.0, 42.0]);
}

#[test]
fn f32_gguf_imports_to_exactly_the_original_weights() {
    for tied in [false, true] {
        let config = common::tiny_config("LlamaForCausalLM", json!({"tie_word_embeddings": tied, "vocab_size": 64}));
        let params = common::tiny_params(&config, 11, DType::F32);
        let tmp = tempfile::tempdir().unwrap();
        let gguf = tmp.path().join("tiny.gguf");
        write_gguf(&gguf, &config, &params, GgmlDType::F32, bpe_metadata(64));
        import(&gguf, &tmp.path().join("hf"), DType::F32).unwrap();
        let (model, imported) = load(&tmp.path().join("hf"));
        assert_eq!(model.config.tie_word_embeddings, tied);
        assert_eq!((model.config.num_key_value_heads, model.config.head_dim), (2, 8));
        for ((name, a), (_, b)) in params.iter().zip(imported.iter()) {
            let diff: f32 =
                (a.as_tensor() - b.as_tensor()).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
            assert_eq!(diff, 0.0, "tied={tied} `{name}`");
        }
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(tmp.path().join("hf/cpt_import.json")).unwrap()).unwrap();
        assert_eq!(report["quantized"], false);
    }
}

#[test]
fn quantized_gguf_imports_within_quantization_error_and_says_so() {
    // Quantized blocks hold 32 values: every row length must be a multiple of 32.
    let config = common::tiny_config("LlamaForCausalLM", json!({"vocab_size": 64, "intermediate_size": 64}));
    let params = common::tiny_params(&config, 12, DType::F32);
    for (dtype, tolerance) in [(GgmlDType::Q8_0, 0.002f32), (GgmlDType::Q4_0, 0.01), (GgmlDType::Q4_1, 0.01)] {
        let tmp = tempfile::tempdir().unwrap();
        let gguf = tmp.path().join("tiny.gguf");
        write_gguf(&gguf, &config, &params, dtype, bpe_metadata(64));
        import(&gguf, &tmp.path().join("hf"), DType::F32).unwrap();
        let (_, imported) = load(&tmp.path().join("hf"));
        for ((name, a), (_, b)) in params.iter().zip(imported.iter()) {
            let diff: f32 =
                (a.as_tensor() - b.as_tensor()).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
            assert!(diff <= tolerance, "{dtype:?} `{name}`: {diff}");
        }
        let report = std::fs::read_to_string(tmp.path().join("hf/cpt_import.json")).unwrap();
        assert!(report.contains("\"quantized\": true") && report.contains(&format!("{dtype:?}")), "{report}");
    }
}

#[test]
fn byte_level_bpe_tokenizer_is_rebuilt_with_merges_and_special_tokens() {
    let config = common::tiny_config("LlamaForCausalLM", json!({"vocab_size": 64}));
    let tmp = tempfile::tempdir().unwrap();
    write_gguf(
        &tmp.path().join("t.gguf"),
        &config,
        &common::tiny_params(&config, 1, DType::F32),
        GgmlDType::F32,
        bpe_metadata(64),
    );
    import(&tmp.path().join("t.gguf"), &tmp.path().join("hf"), DType::F32).unwrap();
    let tokenizer = ModelDir::open(&tmp.path().join("hf")).unwrap().tokenizer().unwrap();
    let encoding = tokenizer.encode("hello<|endoftext|>", true).unwrap();
    assert_eq!(encoding.get_tokens(), &["hell", "o", "<|endoftext|>"]);
    assert_eq!(tokenizer.decode(encoding.get_ids(), true).unwrap(), "hello");
}

#[test]
fn sentencepiece_tokenizer_gets_merges_bos_and_byte_fallback() {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
    let pieces = [
        "▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "ll", "he", "▁he", "llo", "▁hello", "▁w", "or", "▁wor", "ld",
        "▁world",
    ];
    tokens.extend(pieces.iter().map(|s| s.to_string()));
    let vocab_size = tokens.len();
    // Scores rank merges: longer pieces were learned later, so they score lower, as in real models.
    let scores: Vec<Value> = (0..vocab_size).map(|i| Value::F32(-(i as f32))).collect();
    let types: Vec<Value> = (0..vocab_size)
        .map(|i| {
            Value::I32(match i {
                0 => 2,
                1 | 2 => 3,
                3..=258 => 6,
                _ => 1,
            })
        })
        .collect();
    let metadata = vec![
        ("tokenizer.ggml.model", Value::String("llama".into())),
        ("tokenizer.ggml.tokens", Value::Array(tokens.into_iter().map(Value::String).collect())),
        ("tokenizer.ggml.scores", Value::Array(scores)),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.ggml.unknown_token_id", Value::U32(0)),
    ];
    let config = common::tiny_config(
        "LlamaForCausalLM",
        json!({"vocab_size": vocab_size, "bos_token_id": 1, "eos_token_id": 2}),
    );
    let tmp = tempfile::tempdir().unwrap();
    write_gguf(
        &tmp.path().join("t.gguf"),
        &config,
        &common::tiny_params(&config, 1, DType::F32),
        GgmlDType::F32,
        metadata,
    );
    import(&tmp.path().join("t.gguf"), &tmp.path().join("hf"), DType::F32).unwrap();
    let tokenizer = ModelDir::open(&tmp.path().join("hf")).unwrap().tokenizer().unwrap();
    let encoding = tokenizer.encode("hello world é", true).unwrap();
    assert_eq!(encoding.get_tokens(), &["<s>", "▁hello", "▁world", "▁", "<0xC3>", "<0xA9>"]);
    assert_eq!(tokenizer.decode(encoding.get_ids(), true).unwrap(), "hello world é");
}

#[test]
fn unsupported_gguf_architectures_and_pre_tokenizers_are_named_in_the_error() {
    let config = common::tiny_config("LlamaForCausalLM", json!({"vocab_size": 64}));
    let params = common::tiny_params(&config, 1, DType::F32);
    let tmp = tempfile::tempdir().unwrap();
    let mut metadata = bpe_metadata(64);
    metadata[1].1 = Value::String("jais".into());
    write_gguf(&tmp.path().join("t.gguf"), &config, &params, GgmlDType::F32, metadata);
    let error = format!("{:#}", import(&tmp.path().join("t.gguf"), &tmp.path().join("hf"), DType::F32).unwrap_err());
    assert!(error.contains("tokenizer.ggml.pre") && error.contains("jais"), "{error}");
    assert!(!tmp.path().join("hf").exists(), "a failed import leaves no output directory");
}
