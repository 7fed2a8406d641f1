//! The model's shape, read from a HuggingFace `config.json`.
//!
//! Three architectures share one graph: `LlamaForCausalLM`, `MistralForCausalLM` (optional sliding
//! window) and `Qwen2ForCausalLM` (biases on q/k/v). Anything this crate cannot train faithfully is
//! refused with an error that names the architecture or field, never silently approximated.

use serde::Deserialize;
use serde_json::Value;

/// Why a `config.json` was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config.json: `{field}`: {message}")]
    Field { field: String, message: String },
    #[error("config.json: architecture `{0}` is not supported (supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)")]
    Architecture(String),
    #[error("config.json: {0}")]
    Json(#[from] serde_json::Error),
}

fn field_error(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Field { field: field.to_string(), message: message.into() }
}

/// The architectures whose weights and graph this crate supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
}

impl Architecture {
    /// The name HuggingFace uses in `architectures` and its `model_type`.
    pub fn hf_names(self) -> (&'static str, &'static str) {
        match self {
            Architecture::Llama => ("LlamaForCausalLM", "llama"),
            Architecture::Mistral => ("MistralForCausalLM", "mistral"),
            Architecture::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
        }
    }
}

/// RoPE frequency scaling for long contexts.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Positions divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: usize },
}

/// Everything the graph needs to know about a model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Biases on the q, k and v projections (Qwen2 always, Llama when `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama's `attention_bias` covers it too).
    pub o_bias: bool,
    /// Mistral: a token attends to at most this many positions (itself included).
    pub sliding_window: Option<usize>,
    pub initializer_range: f64,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

#[derive(Deserialize)]
struct RawConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    sliding_window: Option<Value>,
    use_sliding_window: Option<bool>,
    initializer_range: Option<f64>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
}

fn required<T>(value: Option<T>, field: &str) -> Result<T, ConfigError> {
    value.ok_or_else(|| field_error(field, "missing"))
}

fn positive(value: Option<usize>, field: &str) -> Result<usize, ConfigError> {
    match required(value, field)? {
        0 => Err(field_error(field, "must be positive")),
        v => Ok(v),
    }
}

fn token_ids(value: Option<&Value>, field: &str) -> Result<Vec<u32>, ConfigError> {
    let as_id = |v: &Value| v.as_u64().and_then(|v| u32::try_from(v).ok());
    match value {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::Array(items)) => {
            items.iter().map(|v| as_id(v).ok_or_else(|| field_error(field, "must be token ids"))).collect()
        }
        Some(v) => as_id(v).map(|id| vec![id]).ok_or_else(|| field_error(field, "must be a token id")),
    }
}

fn rope_scaling(value: &Value, field: &str) -> Result<Option<RopeScaling>, ConfigError> {
    if value.is_null() {
        return Ok(None);
    }
    let kind = value
        .get("rope_type")
        .or_else(|| value.get("type"))
        .and_then(Value::as_str)
        .ok_or_else(|| field_error(&format!("{field}.rope_type"), "missing"))?;
    let number = |name: &str| {
        value
            .get(name)
            .and_then(Value::as_f64)
            .ok_or_else(|| field_error(&format!("{field}.{name}"), "missing or not a number"))
    };
    match kind {
        "default" => Ok(None),
        "linear" => Ok(Some(RopeScaling::Linear { factor: number("factor")? })),
        "llama3" => Ok(Some(RopeScaling::Llama3 {
            factor: number("factor")?,
            low_freq_factor: number("low_freq_factor")?,
            high_freq_factor: number("high_freq_factor")?,
            original_max_position_embeddings: number("original_max_position_embeddings")? as usize,
        })),
        other => Err(field_error(
            &format!("{field}.rope_type"),
            format!("`{other}` is not supported (supported: default, linear, llama3)"),
        )),
    }
}

impl ModelConfig {
    /// Parses the text of a HuggingFace `config.json`.
    pub fn from_json_str(text: &str) -> Result<Self, ConfigError> {
        Self::from_json(&serde_json::from_str(text)?)
    }

    /// Parses a HuggingFace `config.json` value.
    pub fn from_json(value: &Value) -> Result<Self, ConfigError> {
        let raw: RawConfig = serde_json::from_value(value.clone())?;
        let architecture = match raw.architectures.as_deref() {
            Some([name]) => match name.as_str() {
                "LlamaForCausalLM" => Architecture::Llama,
                "MistralForCausalLM" => Architecture::Mistral,
                "Qwen2ForCausalLM" => Architecture::Qwen2,
                other => return Err(ConfigError::Architecture(other.to_string())),
            },
            Some(_) => return Err(field_error("architectures", "must name exactly one architecture")),
            None => match raw.model_type.as_deref() {
                Some("llama") => Architecture::Llama,
                Some("mistral") => Architecture::Mistral,
                Some("qwen2") => Architecture::Qwen2,
                Some(other) => return Err(ConfigError::Architecture(other.to_string())),
                None => return Err(field_error("architectures", "missing")),
            },
        };
        if let Some(act) = raw.hidden_act.as_deref().filter(|a| *a != "silu") {
            return Err(field_error("hidden_act", format!("`{act}` is not supported (only silu)")));
        }
        if raw.mlp_bias == Some(true) {
            return Err(field_error("mlp_bias", "true is not supported"));
        }
        let hidden_size = positive(raw.hidden_size, "hidden_size")?;
        let num_attention_heads = positive(raw.num_attention_heads, "num_attention_heads")?;
        let num_key_value_heads = raw.num_key_value_heads.unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(field_error("num_key_value_heads", "must divide num_attention_heads"));
        }
        let head_dim = match raw.head_dim {
            Some(d) => d,
            None if hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
            None => return Err(field_error("num_attention_heads", "must divide hidden_size when head_dim is absent")),
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(field_error("head_dim", "must be positive and even"));
        }
        // transformers 5 keeps theta and scaling together in `rope_parameters`; older files split them.
        let (rope_theta, rope_scaling) = match &raw.rope_parameters {
            Some(params) if !params.is_null() => {
                let theta = params.get("rope_theta").and_then(Value::as_f64).or(raw.rope_theta);
                (theta, rope_scaling(params, "rope_parameters")?)
            }
            _ => (raw.rope_theta, rope_scaling(raw.rope_scaling.as_ref().unwrap_or(&Value::Null), "rope_scaling")?),
        };
        let rope_theta = rope_theta.unwrap_or(10_000.0);
        if rope_theta <= 0.0 {
            return Err(field_error("rope_theta", "must be positive"));
        }
        let sliding_window = match architecture {
            Architecture::Mistral => match &raw.sliding_window {
                None | Some(Value::Null) => None,
                Some(v) => Some(
                    v.as_u64()
                        .filter(|w| *w > 0)
                        .ok_or_else(|| field_error("sliding_window", "must be a positive integer or null"))?
                        as usize,
                ),
            },
            Architecture::Qwen2 if raw.use_sliding_window == Some(true) => {
                return Err(field_error("use_sliding_window", "true is not supported for Qwen2"));
            }
            _ => None,
        };
        let attention_bias = raw.attention_bias.unwrap_or(false);
        let rms_norm_eps = raw.rms_norm_eps.unwrap_or(1e-6);
        if rms_norm_eps <= 0.0 {
            return Err(field_error("rms_norm_eps", "must be positive"));
        }
        Ok(ModelConfig {
            architecture,
            vocab_size: positive(raw.vocab_size, "vocab_size")?,
            hidden_size,
            intermediate_size: positive(raw.intermediate_size, "intermediate_size")?,
            num_hidden_layers: positive(raw.num_hidden_layers, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(2048),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias: architecture == Architecture::Qwen2 || attention_bias,
            o_bias: architecture == Architecture::Llama && attention_bias,
            sliding_window,
            initializer_range: raw.initializer_range.unwrap_or(0.02),
            bos_token_id: token_ids(raw.bos_token_id.as_ref(), "bos_token_id")?.first().copied(),
            eos_token_ids: token_ids(raw.eos_token_id.as_ref(), "eos_token_id")?,
        })
    }

    /// A HuggingFace `config.json` describing this model, for directories we create (import, init).
    pub fn to_hf_json(&self) -> Value {
        let (class, model_type) = self.architecture.hf_names();
        let rope_scaling = match &self.rope_scaling {
            None => Value::Null,
            Some(RopeScaling::Linear { factor }) => {
                serde_json::json!({"rope_type": "linear", "factor": factor})
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                serde_json::json!({
                    "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                    "high_freq_factor": high_freq_factor,
                    "original_max_position_embeddings": original_max_position_embeddings,
                })
            }
        };
        let eos = match self.eos_token_ids.as_slice() {
            [] => Value::Null,
            [one] => Value::from(*one),
            many => Value::from(many.to_vec()),
        };
        let mut json = serde_json::json!({
            "architectures": [class],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "torch_dtype": "float32",
        });
        let object = json.as_object_mut().expect("a json object literal");
        match self.architecture {
            Architecture::Llama => {
                object.insert("attention_bias".into(), Value::from(self.qkv_bias));
                object.insert("mlp_bias".into(), Value::from(false));
            }
            Architecture::Mistral => {
                object.insert("sliding_window".into(), self.sliding_window.into());
            }
            Architecture::Qwen2 => {
                object.insert("use_sliding_window".into(), Value::from(false));
            }
        }
        json
    }

    /// Query heads per key/value head (grouped-query attention).
    pub fn kv_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// RoPE inverse frequencies, one per pair of head dimensions, with scaling applied.
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let dim = self.head_dim as f64;
        (0..self.head_dim / 2)
            .map(|i| {
                let inv_freq = 1.0 / self.rope_theta.powf(2.0 * i as f64 / dim);
                match self.rope_scaling {
                    None => inv_freq,
                    Some(RopeScaling::Linear { factor }) => inv_freq / factor,
                    Some(RopeScaling::Llama3 {
                        factor,
                        low_freq_factor,
                        high_freq_factor,
                        original_max_position_embeddings,
                    }) => {
                        let old_len = original_max_position_embeddings as f64;
                        let wavelen = 2.0 * std::f64::consts::PI / inv_freq;
                        if wavelen < old_len / high_freq_factor {
                            inv_freq
                        } else if wavelen > old_len / low_freq_factor {
                            inv_freq / factor
                        } else {
                            let smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * inv_freq / factor + smooth * inv_freq
                        }
                    }
                }
            })
            .collect()
    }

    /// Parameters excluding the input embedding (the `N` of the 6·N FLOPs-per-token rule, lm_head included).
    pub fn non_embedding_parameters(&self) -> usize {
        let (h, hd) = (self.hidden_size, self.head_dim);
        let q = self.num_attention_heads * hd;
        let kv = self.num_key_value_heads * hd;
        let attention =
            h * q + 2 * h * kv + q * h + if self.qkv_bias { q + 2 * kv } else { 0 } + if self.o_bias { h } else { 0 };
        let mlp = 3 * h * self.intermediate_size;
        let layer = attention + mlp + 2 * h;
        self.num_hidden_layers * layer + h + self.vocab_size * h
    }

    /// All distinct parameters (a tied lm_head shares the embedding).
    pub fn total_parameters(&self) -> usize {
        let embedding = self.vocab_size * self.hidden_size;
        self.non_embedding_parameters() + if self.tie_word_embeddings { 0 } else { embedding }
    }
}
