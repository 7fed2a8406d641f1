//! The model's trainable tensors under their HuggingFace names, and their safetensors files.
//!
//! A HuggingFace directory holds `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`, in any float dtype. Loading converts to the training dtype and
//! refuses files whose tensor names or shapes do not match the config, naming every offender.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

use crate::config::ModelConfig;

/// Names of buffers that some checkpoints carry but that are derived, not learned.
fn is_derived_buffer(name: &str) -> bool {
    name.ends_with(".rotary_emb.inv_freq")
}

/// The tensors a model of this config has, with their shapes, in a stable order.
pub fn expected_tensors(config: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let h = config.hidden_size;
    let q = config.num_attention_heads * config.head_dim;
    let kv = config.num_key_value_heads * config.head_dim;
    let mut tensors = vec![("model.embed_tokens.weight".to_string(), vec![config.vocab_size, h])];
    for layer in 0..config.num_hidden_layers {
        let p = format!("model.layers.{layer}");
        let mut push = |name: &str, shape: Vec<usize>| tensors.push((format!("{p}.{name}"), shape));
        push("input_layernorm.weight", vec![h]);
        push("self_attn.q_proj.weight", vec![q, h]);
        push("self_attn.k_proj.weight", vec![kv, h]);
        push("self_attn.v_proj.weight", vec![kv, h]);
        push("self_attn.o_proj.weight", vec![h, q]);
        if config.qkv_bias {
            push("self_attn.q_proj.bias", vec![q]);
            push("self_attn.k_proj.bias", vec![kv]);
            push("self_attn.v_proj.bias", vec![kv]);
        }
        if config.o_bias {
            push("self_attn.o_proj.bias", vec![h]);
        }
        push("post_attention_layernorm.weight", vec![h]);
        push("mlp.gate_proj.weight", vec![config.intermediate_size, h]);
        push("mlp.up_proj.weight", vec![config.intermediate_size, h]);
        push("mlp.down_proj.weight", vec![h, config.intermediate_size]);
    }
    tensors.push(("model.norm.weight".to_string(), vec![h]));
    if !config.tie_word_embeddings {
        tensors.push(("lm_head.weight".to_string(), vec![config.vocab_size, h]));
    }
    tensors
}

/// Whether a tensor is a norm weight or a bias, which AdamW's weight decay skips by default.
pub fn is_norm_or_bias(name: &str) -> bool {
    name.ends_with(".bias") || name.ends_with("norm.weight")
}

/// The safetensors files of a HuggingFace model directory, shards included.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).with_context(|| format!("reading {}", index.display()))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", index.display()))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .with_context(|| format!("{}: no `weight_map` object", index.display()))?;
        let files: BTreeSet<&str> = map.values().filter_map(|f| f.as_str()).collect();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    bail!("{}: neither model.safetensors nor model.safetensors.index.json", dir.display())
}

/// A model's parameters keyed by HuggingFace tensor name: the trained ones as candle variables,
/// the frozen ones (an adapter job's base) as plain tensors that no gradient reaches.
pub struct Params {
    vars: BTreeMap<String, Var>,
    frozen: BTreeMap<String, Tensor>,
    /// Frozen projections that read the same input, concatenated once (`…qkv_proj.weight`,
    /// `…gate_up_proj.weight`); their members in `frozen` are row views of these.
    packed: BTreeMap<String, Tensor>,
}

/// The projections each layer runs as one product, by packed name and members.
pub const PACKED: [(&str, [&str; 3]); 2] = [
    ("self_attn.qkv_proj.weight", ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"]),
    ("mlp.gate_up_proj.weight", ["mlp.gate_proj.weight", "mlp.up_proj.weight", ""]),
];

impl Params {
    /// Checks names and shapes against the config and wraps the tensors as variables of `dtype`.
    pub fn from_tensors(config: &ModelConfig, tensors: HashMap<String, Tensor>, dtype: DType) -> Result<Self> {
        Self::from_tensors_freezing(config, tensors, dtype, |_| None)
    }

    /// As [`Params::from_tensors`], except that the tensors `frozen` gives a dtype for are held in
    /// that dtype as frozen tensors.
    pub fn from_tensors_freezing(
        config: &ModelConfig,
        mut tensors: HashMap<String, Tensor>,
        dtype: DType,
        frozen: impl Fn(&str) -> Option<DType>,
    ) -> Result<Self> {
        tensors.retain(|name, _| !is_derived_buffer(name));
        if config.tie_word_embeddings {
            // Tied checkpoints sometimes store lm_head anyway; transformers ignores it, and so do we.
            tensors.remove("lm_head.weight");
        }
        let expected = expected_tensors(config);
        let expected_names: BTreeSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
        let missing: Vec<&str> = expected_names.iter().copied().filter(|n| !tensors.contains_key(*n)).collect();
        let mut unexpected: Vec<&str> =
            tensors.keys().map(String::as_str).filter(|n| !expected_names.contains(n)).collect();
        unexpected.sort_unstable();
        if !missing.is_empty() || !unexpected.is_empty() {
            bail!("weights do not match config.json: missing tensors {missing:?}; unexpected tensors {unexpected:?}");
        }
        let mut params = Self { vars: BTreeMap::new(), frozen: BTreeMap::new(), packed: BTreeMap::new() };
        for (name, shape) in expected {
            let tensor = tensors.remove(&name).expect("checked above");
            if tensor.dims() != shape.as_slice() {
                bail!("tensor `{name}` has shape {:?}, config.json implies {shape:?}", tensor.dims());
            }
            if let Some(frozen_dtype) = frozen(&name) {
                params.frozen.insert(name, tensor.to_dtype(frozen_dtype)?.detach());
            } else {
                params.vars.insert(name, Var::from_tensor(&tensor.to_dtype(dtype)?)?);
            }
        }
        params.pack_frozen(config)?;
        Ok(params)
    }

    /// Concatenates each layer's frozen q/k/v and gate/up once and keeps the members as views.
    fn pack_frozen(&mut self, config: &ModelConfig) -> Result<()> {
        for layer in 0..config.num_hidden_layers {
            for (packed, members) in PACKED {
                let names: Vec<String> =
                    members.iter().filter(|m| !m.is_empty()).map(|m| format!("model.layers.{layer}.{m}")).collect();
                let Some(parts) = names.iter().map(|n| self.frozen.get(n).cloned()).collect::<Option<Vec<_>>>() else {
                    continue;
                };
                let whole = Tensor::cat(&parts, 0)?;
                let mut row = 0;
                for (name, part) in names.iter().zip(&parts) {
                    let rows = part.dim(0)?;
                    self.frozen.insert(name.clone(), whole.narrow(0, row, rows)?);
                    row += rows;
                }
                self.packed.insert(format!("model.layers.{layer}.{packed}"), whole);
            }
        }
        Ok(())
    }

    /// Loads the weights of a HuggingFace model directory.
    pub fn load_dir(dir: &Path, config: &ModelConfig, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_dir_freezing(dir, config, dtype, device, |_| None)
    }

    /// Loads the weights of a HuggingFace model directory, freezing some (see
    /// [`Params::from_tensors_freezing`]).
    pub fn load_dir_freezing(
        dir: &Path,
        config: &ModelConfig,
        dtype: DType,
        device: &Device,
        frozen: impl Fn(&str) -> Option<DType>,
    ) -> Result<Self> {
        let files = weight_files(dir)?;
        // Safety: the files are mapped read-only; cpt never writes a file while a model is loaded from it.
        let mapped = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }
            .with_context(|| format!("reading safetensors in {}", dir.display()))?;
        let mut tensors = HashMap::new();
        for (name, _) in mapped.tensors() {
            let tensor = mapped.load(&name, device).with_context(|| format!("loading tensor `{name}`"))?;
            tensors.insert(name, tensor);
        }
        Self::from_tensors_freezing(config, tensors, dtype, frozen)
            .with_context(|| format!("loading {}", dir.display()))
    }

    /// Fresh weights as transformers initialises a LLaMA: normal(0, initializer_range) for matrices,
    /// ones for norms, zeros for biases, reproducible from `seed`.
    pub fn init_random(config: &ModelConfig, seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        Self::init_random_freezing(config, seed, dtype, device, |_| None)
    }

    /// As [`Params::init_random`], with the tensors `frozen` gives a dtype for frozen in it; each
    /// tensor takes its final dtype as it is drawn, so no f32 copy of the whole model ever exists.
    pub fn init_random_freezing(
        config: &ModelConfig,
        seed: u64,
        dtype: DType,
        device: &Device,
        frozen: impl Fn(&str) -> Option<DType>,
    ) -> Result<Self> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let normal = Normal::new(0.0f32, config.initializer_range as f32)?;
        let mut tensors = HashMap::new();
        for (name, shape) in expected_tensors(config) {
            let count: usize = shape.iter().product();
            let values: Vec<f32> = if name.ends_with("norm.weight") {
                vec![1.0; count]
            } else if name.ends_with(".bias") {
                vec![0.0; count]
            } else {
                (0..count).map(|_| normal.sample(&mut rng)).collect()
            };
            let tensor = Tensor::from_vec(values, shape, device)?.to_dtype(frozen(&name).unwrap_or(dtype))?;
            tensors.insert(name, tensor);
        }
        Self::from_tensors_freezing(config, tensors, dtype, frozen)
    }

    /// The tensor of a parameter, trained or frozen; a trained one shares storage with its
    /// variable, so gradients reach it.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        match (self.vars.get(name), self.frozen.get(name)) {
            (Some(var), _) => Ok(var.as_tensor().clone()),
            (None, Some(frozen)) => Ok(frozen.clone()),
            (None, None) => bail!("no parameter named `{name}`"),
        }
    }

    /// Whether a tensor of this name exists, trained or frozen.
    pub fn contains(&self, name: &str) -> bool {
        self.vars.contains_key(name) || self.frozen.contains_key(name)
    }

    /// A packed frozen projection (see [`PACKED`]), when its members are all frozen.
    pub fn packed(&self, name: &str) -> Option<Tensor> {
        self.packed.get(name).cloned()
    }

    /// Adds a trained tensor (an adapter's), refusing a name that exists.
    pub fn insert_trained(&mut self, name: String, tensor: &Tensor) -> Result<()> {
        if self.contains(&name) {
            bail!("parameter `{name}` exists already");
        }
        self.vars.insert(name, Var::from_tensor(tensor)?);
        Ok(())
    }

    /// Replaces the values of a trained parameter (same shape and dtype).
    pub fn set(&mut self, name: &str, values: &Tensor) -> Result<()> {
        let var = self.vars.get(name).with_context(|| format!("no trained parameter named `{name}`"))?;
        var.set(values).with_context(|| format!("setting `{name}`"))
    }

    /// The trained parameters in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.vars.iter().map(|(n, v)| (n.as_str(), v))
    }

    /// Number of trained scalars.
    pub fn count(&self) -> usize {
        self.vars.values().map(|v| v.elem_count()).sum()
    }

    /// Writes every parameter, trained and frozen, converted to `dtype`, to one safetensors file
    /// that transformers reads.
    pub fn save(&self, path: &Path, dtype: DType) -> Result<()> {
        let trained = self.vars.iter().map(|(name, var)| (name, var.as_tensor()));
        let tensors: Vec<(String, Tensor)> = trained
            .chain(&self.frozen)
            .map(|(name, tensor)| Ok((name.clone(), tensor.to_dtype(dtype)?.contiguous()?)))
            .collect::<Result<_>>()?;
        write_safetensors(path, &tensors)
    }
}

/// Writes tensors to `path` with the `format: pt` metadata transformers expects, and fsyncs the file.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    let views = tensors.iter().map(|(n, t)| (n.as_str(), t));
    safetensors::serialize_to_file(views, metadata, path).with_context(|| format!("writing {}", path.display()))?;
    std::fs::File::open(path)?.sync_all()?;
    Ok(())
}
