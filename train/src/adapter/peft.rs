//! PEFT's adapter format: `adapter_config.json` and `adapter_model.safetensors`, written so that
//! `peft.PeftModel.from_pretrained` loads them and read back (ours and PEFT's own) exactly.
//!
//! Trained embedding/output tables are stored the way PEFT stores them for the same training: whole
//! tables as LoRA's `modules_to_save`; only some rows (`train_rows_from`, or no LoRA at all, which
//! PEFT's LoRA refuses) as trainable tokens — `TRAINABLE_TOKENS` alone, or LoRA's
//! `trainable_token_indices` — whose tensors hold just those rows' values.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use cpt_data::StagedDir;
use cpt_protocol::adapter::{AdapterSpec, BaseDtype, LoraSpec};
use serde_json::{json, Value};

use super::is_saved;
use crate::config::ModelConfig;
use crate::params::{write_safetensors, Params};

/// The adapter's configuration file, PEFT's name.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The adapter's tensors, PEFT's name.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// PEFT's prefix of every tensor name of a causal LM's adapter.
const PREFIX: &str = "base_model.model.";
/// The tensor holding a trainable-tokens layer's rows.
const TOKENS_DELTA: &str = "trainable_tokens_delta";
/// The tables that can be saved, as (cpt's module path, PEFT's module name).
const TABLES: [(&str, &str); 2] = [("model.embed_tokens", "embed_tokens"), ("lm_head", "lm_head")];

/// The trained tables' modules (PEFT's names); with tied embeddings the one table is `embed_tokens`.
fn saved_modules(adapter: &AdapterSpec, config: &ModelConfig) -> Vec<&'static str> {
    let tables = TABLES.iter().filter(|(path, _)| config.tie_word_embeddings.then_some(*path) != Some("lm_head"));
    tables.filter(|(path, _)| is_saved(config, adapter, &format!("{path}.weight"))).map(|(_, m)| *m).collect()
}

/// The rows stored as trainable tokens, when tables are saved that way rather than whole.
fn token_rows(adapter: &AdapterSpec, config: &ModelConfig) -> Option<std::ops::Range<usize>> {
    if saved_modules(adapter, config).is_empty() {
        return None;
    }
    match (adapter.train_rows_from, &adapter.lora) {
        (Some(first), _) => Some(first..config.vocab_size),
        (None, None) => Some(0..config.vocab_size),
        (None, Some(_)) => None,
    }
}

/// `adapter_config.json` as PEFT writes it for this adapter over `base_model`.
pub fn peft_config(adapter: &AdapterSpec, config: &ModelConfig, base_model: &str) -> Value {
    let saved = saved_modules(adapter, config);
    let tied = config.tie_word_embeddings && !saved.is_empty();
    let rows = token_rows(adapter, config).map(|rows| rows.collect::<Vec<_>>());
    let Some(lora) = &adapter.lora else {
        return json!({
            "peft_type": "TRAINABLE_TOKENS",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "target_modules": saved,
            "token_indices": rows.unwrap_or_default(),
            "init_weights": true,
            "inference_mode": true,
        });
    };
    let (modules_to_save, token_indices) = match rows {
        Some(rows) => {
            (Value::Null, json!(saved.iter().map(|m| (*m, rows.clone())).collect::<std::collections::BTreeMap<_, _>>()))
        }
        None if saved.is_empty() => (Value::Null, Value::Null),
        None => (json!(saved), Value::Null),
    };
    json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "use_rslora": lora.rslora,
        "target_modules": lora.target_modules,
        "modules_to_save": modules_to_save,
        "trainable_token_indices": token_indices,
        "ensure_weight_tying": tied,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
    })
}

fn strings(value: &Value) -> Vec<String> {
    value.as_array().map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect()).unwrap_or_default()
}

/// PEFT's module name for a target written as a name or a path (`model.embed_tokens`).
fn table_module(target: &str) -> Option<&'static str> {
    TABLES.iter().map(|(_, m)| *m).find(|m| target == *m || target.ends_with(&format!(".{m}")))
}

/// The rows each table's trainable tokens hold, by PEFT module name.
fn token_indices(json: &Value) -> Result<HashMap<&'static str, Vec<usize>>> {
    let list = |v: &Value| -> Result<Vec<usize>> {
        let items = v.as_array().context("token indices are not a list")?;
        items.iter().map(|i| i.as_u64().map(|i| i as usize).context("a token index is not a number")).collect()
    };
    let mut indices = HashMap::new();
    if json["peft_type"] == "TRAINABLE_TOKENS" {
        let targets = strings(&json["target_modules"]);
        let targets = if targets.is_empty() { vec!["embed_tokens".to_string()] } else { targets };
        for target in targets {
            let module = table_module(&target).with_context(|| format!("trainable tokens on `{target}`"))?;
            indices.insert(module, list(&json["token_indices"])?);
        }
    } else if let Some(map) = json["trainable_token_indices"].as_object() {
        for (target, rows) in map {
            let module = table_module(target).with_context(|| format!("trainable tokens on `{target}`"))?;
            indices.insert(module, list(rows)?);
        }
    } else if json["trainable_token_indices"].is_array() {
        indices.insert("embed_tokens", list(&json["trainable_token_indices"])?);
    }
    Ok(indices)
}

/// The adapter described by a PEFT `adapter_config.json` for a base of shape `config`: LoRA
/// (with whole tables or trainable tokens) or trainable tokens alone.
pub fn from_peft_config(json: &Value, config: &ModelConfig) -> Result<AdapterSpec> {
    let lora = match json["peft_type"].as_str() {
        Some("LORA") => {
            let targets = strings(&json["target_modules"]);
            (!targets.is_empty()).then(|| LoraSpec {
                rank: json["r"].as_u64().unwrap_or(8) as usize,
                alpha: json["lora_alpha"].as_f64().unwrap_or(8.0),
                dropout: json["lora_dropout"].as_f64().unwrap_or(0.0),
                target_modules: targets,
                rslora: json["use_rslora"].as_bool().unwrap_or(false),
            })
        }
        Some("TRAINABLE_TOKENS") => None,
        _ => bail!("peft_type {} is neither LORA nor TRAINABLE_TOKENS", json["peft_type"]),
    };
    let indices = token_indices(json)?;
    let mut modules_to_save: Vec<String> =
        strings(&json["modules_to_save"]).iter().filter_map(|m| table_module(m)).map(str::to_string).collect();
    modules_to_save.extend(indices.keys().map(|m| m.to_string()));
    modules_to_save.sort();
    modules_to_save.dedup();
    // Rows up to the end of the vocabulary are what `train_rows_from` trains; other sets are
    // applied to the tables all the same (see `read_trained`).
    let first = indices.values().flatten().min().copied();
    let train_rows_from = first
        .filter(|&first| first > 0 && indices.values().all(|rows| rows.iter().copied().eq(first..config.vocab_size)));
    let adapter = AdapterSpec {
        lora,
        modules_to_save,
        embedding_lr: None,
        base_dtype: BaseDtype::F32,
        init_from: None,
        train_rows_from,
    };
    adapter.validate().map_err(|e| anyhow::anyhow!("{CONFIG_FILE}: {e}"))?;
    Ok(adapter)
}

/// The trained tensors of the adapter directory `dir` under cpt's names, whole: trainable tokens
/// are written into a copy of the table `params` holds (the base's).
pub fn read_trained(dir: &Path, params: &Params, device: &Device) -> Result<HashMap<String, Tensor>> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let json: Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let indices = token_indices(&json).with_context(|| path.display().to_string())?;
    let weights = dir.join(WEIGHTS_FILE);
    let stored =
        candle_core::safetensors::load(&weights, device).with_context(|| format!("reading {}", weights.display()))?;
    let mut trained = HashMap::new();
    for (name, tensor) in stored {
        let Some(ours) = name.strip_prefix(PREFIX) else {
            bail!("{}: tensor `{name}` lacks PEFT's `{PREFIX}` prefix", weights.display());
        };
        let Some(module_path) = ours.strip_suffix(TOKENS_DELTA).map(|m| m.trim_end_matches('.')) else {
            trained.insert(ours.to_string(), tensor);
            continue;
        };
        let module_path = module_path.trim_end_matches(".token_adapter");
        let Some((table_path, module)) = TABLES.iter().find(|(p, _)| *p == module_path) else {
            bail!("{}: trainable tokens on an unknown module `{module_path}`", weights.display());
        };
        let table = format!("{table_path}.weight");
        // With tied embeddings PEFT writes lm_head's rows too, a copy of embed_tokens'.
        if !params.contains(&table) {
            continue;
        }
        let rows = indices.get(module).or_else(|| indices.get("embed_tokens"));
        let rows = rows.with_context(|| format!("{}: no token indices for `{module}`", path.display()))?;
        trained.insert(table.clone(), with_rows(&params.tensor(&table)?, rows, &tensor, device)?);
    }
    Ok(trained)
}

/// `table` with row `rows[i]` replaced by row `i` of `values`.
fn with_rows(table: &Tensor, rows: &[usize], values: &Tensor, device: &Device) -> Result<Tensor> {
    let (count, width) = values.dims2()?;
    let (height, table_width) = table.dims2()?;
    if count != rows.len() || width != table_width || rows.iter().any(|&r| r >= height) {
        bail!(
            "trainable tokens of shape {:?} for {} rows do not fit a table of {:?}",
            values.dims(),
            rows.len(),
            table.dims()
        );
    }
    let mut flat = table.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let values = values.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    for (&row, value) in rows.iter().zip(values) {
        flat[row * width..(row + 1) * width].copy_from_slice(&value);
    }
    Ok(Tensor::from_vec(flat, table.dims(), device)?)
}

/// Writes the trained tensors of `params` and `adapter_config.json` into `staged`.
pub fn write_adapter_files(
    staged: &StagedDir,
    params: &Params,
    adapter: &AdapterSpec,
    config: &ModelConfig,
    base_model: &str,
) -> Result<()> {
    staged.write(CONFIG_FILE, serde_json::to_string_pretty(&peft_config(adapter, config, base_model))?)?;
    let rows = token_rows(adapter, config);
    let tied = config.tie_word_embeddings;
    let mut tensors = Vec::new();
    for (name, var) in params.iter() {
        let table = TABLES.iter().find(|(path, _)| format!("{path}.weight") == name);
        match (table, &rows) {
            (Some((path, _)), Some(rows)) => {
                let values = var.as_tensor().narrow(0, rows.start, rows.len())?.contiguous()?;
                let adapter_path = if adapter.lora.is_some() { ".token_adapter" } else { "" };
                // PEFT writes the tied output layer's rows too, as a copy.
                let paths = if tied { vec!["model.embed_tokens", "lm_head"] } else { vec![*path] };
                for path in paths {
                    tensors.push((format!("{PREFIX}{path}{adapter_path}.{TOKENS_DELTA}"), values.clone()));
                }
            }
            _ => tensors.push((format!("{PREFIX}{name}"), var.as_tensor().contiguous()?)),
        }
    }
    if tied && rows.is_none() && is_saved(config, adapter, "model.embed_tokens.weight") {
        // PEFT ties lm_head's saved copy to embed_tokens' and expects both in the file.
        tensors.push((format!("{PREFIX}lm_head.weight"), params.tensor("model.embed_tokens.weight")?.contiguous()?));
    }
    write_safetensors(&staged.path().join(WEIGHTS_FILE), &tensors)
}
