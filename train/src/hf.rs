//! HuggingFace model directories: reading one into a trainable model, writing one that
//! `transformers.AutoModelForCausalLM` and `AutoTokenizer` load as is.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use cpt_data::StagedDir;
use serde_json::{json, Value};
use tokenizers::Tokenizer;

use crate::config::ModelConfig;
use crate::params::Params;

/// Files copied verbatim from a source directory when present, so export loses nothing.
const PASSTHROUGH_FILES: [&str; 4] =
    ["tokenizer_config.json", "special_tokens_map.json", "generation_config.json", IMPORT_REPORT];

/// Provenance written by `import`: where the weights came from and whether they were quantized.
pub const IMPORT_REPORT: &str = "cpt_import.json";

/// A model directory on disk (HF layout; cpt checkpoints use the same layout).
pub struct ModelDir {
    pub path: PathBuf,
    pub config_json: Value,
    pub config: ModelConfig,
}

impl ModelDir {
    /// Reads and validates `config.json`.
    pub fn open(path: &Path) -> Result<Self> {
        let (config_json, config) = read_config(&path.join("config.json"))?;
        Ok(Self { path: path.to_path_buf(), config_json, config })
    }

    /// The weights as trainable variables of `dtype`.
    pub fn load_params(&self, dtype: DType, device: &Device) -> Result<Params> {
        Params::load_dir(&self.path, &self.config, dtype, device)
    }

    /// The path of `tokenizer.json`.
    pub fn tokenizer_path(&self) -> PathBuf {
        self.path.join("tokenizer.json")
    }

    /// The model's tokenizer.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        load_tokenizer(&self.tokenizer_path())
    }
}

/// Reads and validates a `config.json`, naming the file on failure; returns it as written and parsed.
fn read_config(path: &Path) -> Result<(Value, ModelConfig)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let json: Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let config = ModelConfig::from_json(&json).with_context(|| format!("in {}", path.display()))?;
    Ok((json, config))
}

/// Loads a `tokenizer.json`, naming the file on failure.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    Tokenizer::from_file(path).map_err(|e| anyhow::anyhow!("loading tokenizer {}: {e}", path.display()))
}

/// Everything a written model directory contains.
pub struct ModelFiles<'a> {
    pub config_json: Value,
    pub params: &'a Params,
    pub dtype: DType,
    pub tokenizer: &'a Tokenizer,
    /// Extra files to write beside the weights, `(file name, contents)`; they win over generated ones.
    pub extra: Vec<(String, String)>,
}

/// The transformers name of a dtype, for `torch_dtype` in `config.json`.
fn torch_dtype(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "float32",
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        other => bail!("cannot write weights as {other:?}: use f32, bf16 or f16"),
    })
}

fn token_text(tokenizer: &Tokenizer, id: Option<u32>) -> Value {
    id.and_then(|id| tokenizer.id_to_token(id)).map_or(Value::Null, Value::from)
}

/// `tokenizer_config.json` for a tokenizer that only has `tokenizer.json`.
fn tokenizer_config(config: &ModelConfig, tokenizer: &Tokenizer) -> Value {
    json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token_text(tokenizer, config.bos_token_id),
        "eos_token": token_text(tokenizer, config.eos_token_ids.first().copied()),
        "model_max_length": config.max_position_embeddings,
        "clean_up_tokenization_spaces": false,
    })
}

fn generation_config(config: &ModelConfig) -> Value {
    json!({"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_ids, "do_sample": false})
}

/// Writes a complete model directory at `out`, atomically: everything goes into a sibling temporary
/// directory that is fsynced and renamed into place, so `out` is either absent or complete.
pub fn write_model_dir(out: &Path, files: ModelFiles<'_>) -> Result<()> {
    let staged = StagedDir::begin(out)?;
    write_model_files(&staged, files)?;
    staged.commit()?;
    Ok(())
}

/// Writes the files of a model directory (config, tokenizer, weights, extras) into `staged`.
pub fn write_model_files(staged: &StagedDir, files: ModelFiles<'_>) -> Result<()> {
    let config = ModelConfig::from_json(&files.config_json)?;
    let mut config_json = files.config_json;
    let object = config_json.as_object_mut().context("config.json is not an object")?;
    object.insert("torch_dtype".into(), torch_dtype(files.dtype)?.into());
    object.remove("dtype"); // transformers 5's spelling; one source of truth is enough.
                            // transformers picks the model class from these; a hand-written config may lack one of them.
    let (class, model_type) = config.architecture.hf_names();
    object.entry("model_type").or_insert(model_type.into());
    object.entry("architectures").or_insert(serde_json::json!([class]));

    staged.write("config.json", serde_json::to_string_pretty(&config_json)?)?;
    write_tokenizer(staged, files.tokenizer)?;
    let generated = [
        ("tokenizer_config.json", tokenizer_config(&config, files.tokenizer)),
        ("generation_config.json", generation_config(&config)),
    ];
    for (file, value) in generated {
        if !files.extra.iter().any(|(f, _)| f == file) {
            staged.write(file, serde_json::to_string_pretty(&value)?)?;
        }
    }
    for (file, text) in &files.extra {
        staged.write(file, text)?;
    }
    files.params.save(&staged.path().join("model.safetensors"), files.dtype)
}

/// Writes `tokenizer.json` into `staged`.
pub fn write_tokenizer(staged: &StagedDir, tokenizer: &Tokenizer) -> Result<()> {
    let json = tokenizer.to_string(true).map_err(|e| anyhow::anyhow!("serialising tokenizer: {e}"))?;
    staged.write("tokenizer.json", json)
}

/// Passthrough files of a model directory that exist, as `(name, contents)`.
pub fn passthrough_files(source: &Path) -> Result<Vec<(String, String)>> {
    let mut extra = Vec::new();
    for file in PASSTHROUGH_FILES {
        let path = source.join(file);
        if path.exists() {
            let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            extra.push((file.to_string(), text));
        }
    }
    Ok(extra)
}

/// Writes `source` (a model directory or checkpoint) to `out` as a HF directory with weights in `dtype`.
pub fn export(source: &Path, out: &Path, dtype: DType) -> Result<()> {
    let model = ModelDir::open(source)?;
    // f32 holds every bf16/f16 value exactly, so each tensor is rounded at most once, on save.
    let params = model.load_params(DType::F32, &Device::Cpu)?;
    let tokenizer = model.tokenizer()?;
    let mut extra = Vec::new();
    for file in PASSTHROUGH_FILES {
        let path = source.join(file);
        if path.exists() {
            extra.push((
                file.to_string(),
                std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?,
            ));
        }
    }
    write_model_dir(
        out,
        ModelFiles { config_json: model.config_json, params: &params, dtype, tokenizer: &tokenizer, extra },
    )
}

/// Writes a randomly initialised model of the shape in `config_path` to `out`, with the tokenizer
/// at `tokenizer_path`, reproducible from `seed`.
pub fn init_model_dir(config_path: &Path, tokenizer_path: &Path, out: &Path, seed: u64) -> Result<ModelConfig> {
    let (config_json, config) = read_config(config_path)?;
    let tokenizer = load_tokenizer(tokenizer_path)?;
    let tokenizer_vocab = tokenizer.get_vocab_size(true);
    if tokenizer_vocab > config.vocab_size {
        bail!("{} has {tokenizer_vocab} tokens but vocab_size is {}", tokenizer_path.display(), config.vocab_size);
    }
    let params = Params::init_random(&config, seed, DType::F32, &Device::Cpu)?;
    write_model_dir(
        out,
        ModelFiles { config_json, params: &params, dtype: DType::F32, tokenizer: &tokenizer, extra: vec![] },
    )?;
    Ok(config)
}
