//! GGUF (`llama` architecture) to a HuggingFace directory, with candle's GGUF reader.
//!
//! Three things go wrong in naive converters and are handled here: llama.cpp stores the q and k
//! projections with their rows permuted for its interleaved RoPE (undone by [`unpermute_rows`]),
//! files without `output.weight` have tied embeddings, and the tokenizer lives only in metadata
//! (rebuilt by [`tokenizer::from_metadata`]).

pub mod tokenizer;

use std::collections::{BTreeMap, HashMap};
use std::io::BufReader;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};
use serde_json::json;

use crate::config::{Architecture, ModelConfig};
use crate::hf::{write_model_dir, ModelFiles, IMPORT_REPORT};
use crate::params::Params;

/// Metadata access with errors that name the key.
pub(crate) struct Metadata<'a>(pub &'a HashMap<String, Value>);

impl Metadata<'_> {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key)
    }
    pub fn require(&self, key: &str) -> Result<&Value> {
        self.0.get(key).with_context(|| format!("GGUF metadata `{key}` is missing"))
    }
    pub fn usize(&self, key: &str) -> Result<usize> {
        let value = match self.require(key)? {
            Value::U8(v) => Some(u64::from(*v)),
            Value::U16(v) => Some(u64::from(*v)),
            Value::U32(v) => Some(u64::from(*v)),
            Value::U64(v) => Some(*v),
            Value::I32(v) => u64::try_from(*v).ok(),
            Value::I64(v) => u64::try_from(*v).ok(),
            _ => None,
        };
        let value = value.with_context(|| format!("GGUF metadata `{key}` is not a non-negative integer"))?;
        usize::try_from(value).with_context(|| format!("GGUF metadata `{key}` is too large"))
    }
    pub fn f64(&self, key: &str) -> Result<f64> {
        let value = self.require(key)?;
        value
            .to_f32()
            .map(f64::from)
            .or_else(|_| value.to_f64())
            .with_context(|| format!("GGUF metadata `{key}` is not a number"))
    }
    pub fn optional_u32(&self, key: &str) -> Result<Option<u32>> {
        self.get(key).map(|v| v.to_u32().with_context(|| format!("GGUF metadata `{key}` is not a u32"))).transpose()
    }
    pub fn string(&self, key: &str) -> Result<&str> {
        Ok(self.require(key)?.to_string().with_context(|| format!("GGUF metadata `{key}` is not a string"))?.as_str())
    }
    pub fn array(&self, key: &str) -> Result<&Vec<Value>> {
        self.require(key)?.to_vec().with_context(|| format!("GGUF metadata `{key}` is not an array"))
    }
}

/// The HF config implied by `llama.*` metadata.
fn config_from_metadata(meta: &Metadata, vocab_size: usize, tied: bool) -> Result<ModelConfig> {
    let architecture = meta.string("general.architecture")?;
    if architecture != "llama" {
        bail!("GGUF architecture `{architecture}` is not supported (only `llama`)");
    }
    let hidden_size = meta.usize("llama.embedding_length")?;
    let heads = meta.usize("llama.attention.head_count")?;
    let head_dim = match meta.get("llama.rope.dimension_count") {
        Some(_) => meta.usize("llama.rope.dimension_count")?,
        None => hidden_size / heads,
    };
    if meta.get("llama.rope.scaling.type").is_some() {
        bail!("GGUF metadata `llama.rope.scaling.type` is set; scaled RoPE import is not supported");
    }
    let eos = meta.optional_u32("tokenizer.ggml.eos_token_id")?;
    let json = json!({
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": meta.usize("llama.feed_forward_length")?,
        "num_hidden_layers": meta.usize("llama.block_count")?,
        "num_attention_heads": heads,
        "num_key_value_heads": match meta.get("llama.attention.head_count_kv") {
            Some(_) => meta.usize("llama.attention.head_count_kv")?,
            None => heads,
        },
        "head_dim": head_dim,
        "rms_norm_eps": meta.f64("llama.attention.layer_norm_rms_epsilon")?,
        "rope_theta": match meta.get("llama.rope.freq_base") { Some(_) => meta.f64("llama.rope.freq_base")?, None => 10_000.0 },
        "max_position_embeddings": meta.usize("llama.context_length")?,
        "tie_word_embeddings": tied,
        "bos_token_id": meta.optional_u32("tokenizer.ggml.bos_token_id")?,
        "eos_token_id": eos,
    });
    let config = ModelConfig::from_json(&json)?;
    debug_assert_eq!(config.architecture, Architecture::Llama);
    Ok(config)
}

/// HF name of a llama.cpp tensor name.
fn hf_tensor_name(name: &str) -> Result<String> {
    let fixed = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(fixed) = fixed {
        return Ok(fixed.to_string());
    }
    let rest = name.strip_prefix("blk.").with_context(|| format!("unknown GGUF tensor `{name}`"))?;
    let (layer, rest) = rest.split_once('.').with_context(|| format!("unknown GGUF tensor `{name}`"))?;
    let (part, suffix) = rest.split_once('.').with_context(|| format!("unknown GGUF tensor `{name}`"))?;
    let hf = match part {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => bail!("unknown GGUF tensor `{name}`"),
    };
    Ok(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// Undoes llama.cpp's row permutation of a q or k projection `(heads·head_dim, ...)`.
///
/// llama.cpp's converter reshapes rows as `(heads, 2, head_dim/2)` and swaps the last two axes so
/// that RoPE pairs are adjacent; the inverse reshapes as `(heads, head_dim/2, 2)` and swaps back.
pub fn unpermute_rows(tensor: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let dims = tensor.dims().to_vec();
    let rows = dims[0];
    let rest: usize = dims[1..].iter().product();
    tensor.reshape((heads, rows / heads / 2, 2, rest))?.transpose(1, 2)?.contiguous()?.reshape(dims)
}

/// The inverse of [`unpermute_rows`]: llama.cpp's own permutation, for writing test files.
pub fn permute_rows(tensor: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let dims = tensor.dims().to_vec();
    let rows = dims[0];
    let rest: usize = dims[1..].iter().product();
    tensor.reshape((heads, 2, rows / heads / 2, rest))?.transpose(1, 2)?.contiguous()?.reshape(dims)
}

/// Imports `gguf_path` into a new HF directory `out` with weights stored as `dtype`.
pub fn import(gguf_path: &Path, out: &Path, dtype: DType) -> Result<ModelConfig> {
    let open = || std::fs::File::open(gguf_path).with_context(|| format!("opening {}", gguf_path.display()));
    let mut reader = BufReader::new(open()?);
    let content =
        Content::read(&mut reader).with_context(|| format!("reading GGUF header of {}", gguf_path.display()))?;
    let meta = Metadata(&content.metadata);
    let tokenizer = tokenizer::from_metadata(&meta).context("rebuilding the tokenizer from GGUF metadata")?;
    let vocab_size = match meta.get("llama.vocab_size") {
        Some(_) => meta.usize("llama.vocab_size")?,
        None => meta.array("tokenizer.ggml.tokens")?.len(),
    };
    let tied = !content.tensor_infos.contains_key("output.weight");
    let config = config_from_metadata(&meta, vocab_size, tied)?;

    let mut tensors = HashMap::new();
    let mut source_types: BTreeMap<String, usize> = BTreeMap::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        if name == "rope_freqs.weight" || name.ends_with(".rope_freqs.weight") {
            bail!("GGUF tensor `{name}` (scaled RoPE frequencies) is not supported");
        }
        let qtensor = content.tensor(&mut reader, name, &Device::Cpu).with_context(|| format!("reading `{name}`"))?;
        *source_types.entry(format!("{:?}", qtensor.dtype())).or_default() += 1;
        let hf_name = hf_tensor_name(name)?;
        let mut tensor = qtensor.dequantize(&Device::Cpu).with_context(|| format!("dequantizing `{name}`"))?;
        if hf_name.ends_with("q_proj.weight") {
            tensor = unpermute_rows(&tensor, config.num_attention_heads)?;
        } else if hf_name.ends_with("k_proj.weight") {
            tensor = unpermute_rows(&tensor, config.num_key_value_heads)?;
        }
        tensors.insert(hf_name, tensor);
    }
    let params = Params::from_tensors(&config, tensors, DType::F32)?;
    let quantized = source_types.keys().any(|t| !matches!(t.as_str(), "F32" | "F16" | "BF16"));
    let report = json!({
        "source": gguf_path.display().to_string(),
        "source_sha256": cpt_data::sha256_file(gguf_path)?,
        "source_name": meta.get("general.name").and_then(|v| v.to_string().ok()),
        "quantized": quantized,
        "tensor_types": source_types,
        "note": if quantized {
            "weights were dequantized from a quantized GGUF file: they are not the original full-precision weights"
        } else {
            "weights were converted from an unquantized GGUF file"
        },
    });
    let extra = vec![(IMPORT_REPORT.to_string(), serde_json::to_string_pretty(&report)?)];
    let files = ModelFiles { config_json: config.to_hf_json(), params: &params, dtype, tokenizer: &tokenizer, extra };
    write_model_dir(out, files)?;
    Ok(config)
}
