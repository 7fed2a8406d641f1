//! Adapter jobs: a frozen base with LoRA adapters and fully trained `modules_to_save`, stored as
//! a PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors`) that
//! `peft.PeftModel.from_pretrained` loads onto the base, and merged into a plain model on export.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use cpt_protocol::adapter::{AdapterSpec, BaseDtype, LoraSpec, LORA_TARGETS};
use rand::SeedableRng;
use rand_distr::{Distribution, Uniform};
use serde_json::Value;
use tokenizers::Tokenizer;

use crate::config::ModelConfig;
use crate::hf::ModelDir;
use crate::model::LoraSettings;
use crate::params::Params;

mod peft;

pub use peft::{write_adapter_files, CONFIG_FILE, WEIGHTS_FILE};

/// Whether `dir` holds an adapter rather than a whole model.
pub fn is_adapter_dir(dir: &Path) -> bool {
    dir.join(CONFIG_FILE).exists()
}

/// How `adapter` applies its LoRA updates, outside training (dropout is set by the trainer).
pub fn settings(adapter: &AdapterSpec) -> LoraSettings {
    let lora = adapter.lora.as_ref();
    LoraSettings { scale: lora.map_or(1.0, LoraSpec::scale), dropout: lora.map_or(0.0, |l| l.dropout) }
}

fn module_path(layer: usize, module: &str) -> String {
    let block = if matches!(module, "q_proj" | "k_proj" | "v_proj" | "o_proj") { "self_attn" } else { "mlp" };
    format!("model.layers.{layer}.{block}.{module}")
}

/// The LoRA tensors of `adapter` on `config`, with their shapes: `(name, (rank, in) | (out, rank))`.
pub fn lora_tensors(config: &ModelConfig, adapter: &AdapterSpec) -> Vec<(String, Vec<usize>)> {
    let Some(lora) = &adapter.lora else { return vec![] };
    let shapes: HashMap<String, Vec<usize>> = crate::params::expected_tensors(config).into_iter().collect();
    let mut tensors = Vec::new();
    for layer in 0..config.num_hidden_layers {
        for module in LORA_TARGETS.iter().filter(|m| adapter.adapts(m)) {
            let path = module_path(layer, module);
            let (out, input) = match shapes[&format!("{path}.weight")][..] {
                [out, input] => (out, input),
                _ => unreachable!("projections are matrices"),
            };
            tensors.push((format!("{path}.lora_A.weight"), vec![lora.rank, input]));
            tensors.push((format!("{path}.lora_B.weight"), vec![out, lora.rank]));
        }
    }
    tensors
}

/// Whether the base tensor `name` is trained in full (a saved module; with tied embeddings
/// `embed_tokens` and `lm_head` are one tensor).
pub fn is_saved(config: &ModelConfig, adapter: &AdapterSpec, name: &str) -> bool {
    let tied = config.tie_word_embeddings;
    (name == "model.embed_tokens.weight" && adapter.trains_embedding(tied))
        || (name == "lm_head.weight" && adapter.trains_output(tied))
}

fn dtype(base: BaseDtype) -> DType {
    match base {
        BaseDtype::Bf16 => DType::BF16,
        BaseDtype::F16 => DType::F16,
        BaseDtype::F32 => DType::F32,
    }
}

/// Where an adapter job's trained tensors start.
#[derive(Debug, Clone, Copy)]
pub enum Start<'a> {
    /// PEFT's initialisation of the LoRA factors — `A` uniform in ±1/√in (kaiming uniform with
    /// a = √5), `B` zero — and the base's rows for the saved modules.
    Fresh,
    /// A PEFT adapter directory holding every trained tensor (a checkpoint being resumed).
    Exactly(&'a Path),
    /// The trained tensors a PEFT adapter directory holds (`init_from`), the others fresh: e.g. a
    /// second stage adding LoRA to the embeddings a first stage trained.
    From(&'a Path),
}

/// The parameters of an adapter job: the base frozen in `base_dtype` except the saved modules
/// (f32, trained), and the adapters (see [`add_adapters`]).
pub fn open_params(base: &ModelDir, adapter: &AdapterSpec, start: Start, seed: u64, device: &Device) -> Result<Params> {
    let config = &base.config;
    let mut params = Params::load_dir_freezing(&base.path, config, DType::F32, device, frozen_dtype(config, adapter))?;
    add_adapters(&mut params, config, adapter, start, seed, device)?;
    Ok(params)
}

/// The dtype each base tensor is frozen in, `None` for the saved (trained) ones.
pub fn frozen_dtype<'a>(config: &'a ModelConfig, adapter: &'a AdapterSpec) -> impl Fn(&str) -> Option<DType> + 'a {
    move |name: &str| (!is_saved(config, adapter, name)).then_some(dtype(adapter.base_dtype))
}

/// Adds the LoRA factors to `params` and sets the saved modules as `start` says; the fresh ones
/// are reproducible from `seed`.
pub fn add_adapters(
    params: &mut Params,
    config: &ModelConfig,
    adapter: &AdapterSpec,
    start: Start,
    seed: u64,
    device: &Device,
) -> Result<()> {
    let expected = lora_tensors(config, adapter);
    let (mut loaded, dir, complete) = match start {
        Start::Fresh => (HashMap::new(), Path::new(""), false),
        Start::Exactly(dir) => (peft::read_trained(dir, params, device)?, dir, true),
        Start::From(dir) => (peft::read_trained(dir, params, device)?, dir, false),
    };
    let saved = saved_shapes(config, adapter);
    for (name, shape) in expected.iter().chain(&saved) {
        match loaded.get(name) {
            Some(t) if t.dims() == shape.as_slice() => {}
            Some(t) => bail!("{}: `{name}` has shape {:?}, the spec implies {shape:?}", dir.display(), t.dims()),
            None if complete => {
                bail!("{}: no tensor `{name}` (the adapter was trained with another spec?)", dir.display())
            }
            None => {}
        }
    }
    for (name, _) in &saved {
        if let Some(tensor) = loaded.remove(name) {
            params.set(name, &tensor.to_dtype(DType::F32)?)?;
        }
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x4c6f_5241);
    for (name, shape) in expected {
        let tensor = match loaded.remove(&name) {
            Some(tensor) => tensor.to_dtype(DType::F32)?,
            None if name.ends_with("lora_A.weight") => {
                let bound = 1.0 / (shape[1] as f32).sqrt();
                let uniform = Uniform::new_inclusive(-bound, bound)?;
                let values: Vec<f32> = (0..shape[0] * shape[1]).map(|_| uniform.sample(&mut rng)).collect();
                Tensor::from_vec(values, shape, device)?
            }
            None => Tensor::zeros(shape, DType::F32, device)?,
        };
        params.insert_trained(name, &tensor)?;
    }
    Ok(())
}

fn saved_shapes(config: &ModelConfig, adapter: &AdapterSpec) -> Vec<(String, Vec<usize>)> {
    crate::params::expected_tensors(config).into_iter().filter(|(name, _)| is_saved(config, adapter, name)).collect()
}

/// An adapter directory opened for use: its base, the adapter, and the combined parameters.
pub struct Opened {
    pub base: ModelDir,
    pub adapter: AdapterSpec,
    pub params: Params,
    /// The adapter directory's own tokenizer (an extended vocabulary), else the base's.
    pub tokenizer: Tokenizer,
}

/// Opens an adapter directory over the base model its `adapter_config.json` names, in f32.
pub fn open_dir(dir: &Path, device: &Device) -> Result<Opened> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let json: Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let base_path = json["base_model_name_or_path"]
        .as_str()
        .with_context(|| format!("{}: no base_model_name_or_path", path.display()))?;
    let base = ModelDir::open(Path::new(base_path)).with_context(|| format!("the base model of {}", dir.display()))?;
    let adapter = peft::from_peft_config(&json, &base.config)?;
    let params = open_params(&base, &adapter, Start::Exactly(dir), 0, device)?;
    let own = dir.join("tokenizer.json");
    let tokenizer = if own.exists() { crate::hf::load_tokenizer(&own)? } else { base.tokenizer()? };
    Ok(Opened { base, adapter, params, tokenizer })
}

/// The base's weights with the adapter merged in: `W + scale·B·A` for every adapted projection,
/// the saved modules replacing the base's. All tensors trainable, in f32.
pub fn merged_params(opened: &Opened) -> Result<Params> {
    let config = &opened.base.config;
    let mut merged = opened.base.load_params(DType::F32, &Device::Cpu)?;
    let scale = settings(&opened.adapter).scale;
    for (name, _) in saved_shapes(config, &opened.adapter) {
        merged.set(&name, &opened.params.tensor(&name)?)?;
    }
    for (name, _) in lora_tensors(config, &opened.adapter).iter().filter(|(n, _)| n.ends_with(".lora_A.weight")) {
        let module = name.trim_end_matches(".lora_A.weight");
        let a = opened.params.tensor(name)?.to_device(&Device::Cpu)?;
        let b = opened.params.tensor(&format!("{module}.lora_B.weight"))?.to_device(&Device::Cpu)?;
        let weight = format!("{module}.weight");
        let update = (b.matmul(&a)? * scale)?;
        merged.set(&weight, &(merged.tensor(&weight)? + update)?)?;
    }
    Ok(merged)
}
