//! Vocabulary extension for a domain's language: a BPE trained on the domain corpus with the
//! `tokenizers` crate, its new tokens and merges appended to the base tokenizer (no existing id
//! changes), and a model whose new embedding and output rows start as the mean of the rows of each
//! new token's pieces under the old tokenizer.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use serde_json::Value;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::Tokenizer;

use crate::hf::{self, ModelDir, ModelFiles};
use crate::params::Params;

/// The extended model directory's copy of its [`ExtensionReport`].
pub const REPORT_FILE: &str = "vocab_extension.json";

/// What an extension did, and the fertility it was for.
#[derive(Debug, Clone, Serialize)]
pub struct ExtensionReport {
    pub base_vocab_size: usize,
    pub added_tokens: usize,
    pub vocab_size: usize,
    /// Tokens per 1000 characters of each text, before and after.
    pub fertility: Vec<Fertility>,
}

/// Tokens per 1000 characters of one text under the old and the new tokenizer.
#[derive(Debug, Clone, Serialize)]
pub struct Fertility {
    pub text: String,
    pub characters: usize,
    pub before: f64,
    pub after: f64,
}

/// Tokens per 1000 characters of `text`.
pub fn fertility(tokenizer: &Tokenizer, text: &str) -> Result<f64> {
    let encoding = tokenizer.encode(text, false).map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
    Ok(1000.0 * encoding.len() as f64 / text.chars().count().max(1) as f64)
}

/// A BPE merge as tokenizer.json stores it.
type Merge = (String, String);

fn merges_of(model: &Value) -> Result<Vec<Merge>> {
    let merges = model["merges"].as_array().context("tokenizer.json: model.merges is not a list")?;
    merges
        .iter()
        .map(|m| match (m.as_str(), m.as_array()) {
            (Some(text), _) => text.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())),
            (_, Some(pair)) if pair.len() == 2 => Some((pair[0].as_str()?.to_string(), pair[1].as_str()?.to_string())),
            _ => None,
        })
        .collect::<Option<Vec<_>>>()
        .context("tokenizer.json: a merge is neither \"a b\" nor [a, b]")
}

/// The new tokens (with the merge that makes each) of a byte-level BPE trained on `documents` with
/// `base`'s normaliser and pre-tokeniser, in the order the trainer created them, skipping tokens
/// `base` already has; at most `count`.
fn train_new_tokens(
    base: &Tokenizer,
    base_vocab: &HashMap<String, u32>,
    documents: impl Iterator<Item = String> + Send,
    count: usize,
    min_frequency: u64,
) -> Result<Vec<(String, Merge)>> {
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        // Enough room that `count` tokens survive the skipping of those `base` already has.
        .vocab_size(256 + 4 * count)
        .min_frequency(min_frequency)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .show_progress(false)
        .build()
        .into();
    let mut domain = base.clone();
    domain.with_model(tokenizers::ModelWrapper::from(BPE::default()));
    domain.train(&mut trainer, documents).map_err(|e| anyhow::anyhow!("training the domain BPE: {e}"))?;
    let json = tokenizer_json(&domain)?;
    let mut added: Vec<(String, Merge)> = Vec::new();
    let mut known: HashSet<String> = base_vocab.keys().cloned().collect();
    for (a, b) in merges_of(&json["model"])? {
        let token = format!("{a}{b}");
        // Both pieces exist by now: they are base tokens or were added earlier (merge order).
        if known.contains(&token) || !known.contains(&a) || !known.contains(&b) {
            continue;
        }
        known.insert(token.clone());
        added.push((token, (a, b)));
        if added.len() == count {
            break;
        }
    }
    Ok(added)
}

/// A tokenizer as its tokenizer.json.
fn tokenizer_json(tokenizer: &Tokenizer) -> Result<Value> {
    Ok(serde_json::from_str(&tokenizer.to_string(false).map_err(|e| anyhow::anyhow!("{e}"))?)?)
}

/// The base's tokenizer.json `json` with `added` appended: new vocabulary entries from `first_id`
/// on, and their merges after the existing ones (so every existing merge keeps its priority).
fn extended_tokenizer(mut json: Value, added: &[(String, Merge)], first_id: u32) -> Result<Tokenizer> {
    let model = &mut json["model"];
    let as_strings = model["merges"].as_array().and_then(|m| m.first()).is_some_and(Value::is_string);
    let vocab = model["vocab"].as_object_mut().context("tokenizer.json: model.vocab is not a map")?;
    for (i, (token, _)) in added.iter().enumerate() {
        vocab.insert(token.clone(), Value::from(first_id + i as u32));
    }
    let merges = model["merges"].as_array_mut().expect("checked by merges_of");
    for (_, (a, b)) in added {
        merges.push(if as_strings { Value::from(format!("{a} {b}")) } else { serde_json::json!([a, b]) });
    }
    json.to_string().parse().map_err(|e| anyhow::anyhow!("the extended tokenizer does not load: {e}"))
}

/// Extends the model directory `base` with up to `count` tokens learned from `corpus` (files,
/// directories or globs of `.txt`/`.jsonl`), writing a new model directory to `out`; reports the
/// fertility of each of `texts` before and after.
pub fn extend(
    base: &Path,
    corpus: &[std::path::PathBuf],
    count: usize,
    min_frequency: u64,
    texts: &[std::path::PathBuf],
    out: &Path,
) -> Result<ExtensionReport> {
    let model = ModelDir::open(base)?;
    let old = model.tokenizer()?;
    let json = tokenizer_json(&old)?;
    let byte_level = json["pre_tokenizer"].to_string().contains("ByteLevel");
    if json["model"]["type"] != "BPE" || !byte_level {
        bail!("{}: only byte-level BPE tokenizers (GPT-2, Llama 3, SmolLM, Qwen) can be extended", base.display());
    }
    let base_vocab = old.get_vocab(true);
    let files = cpt_data::input::input_files(corpus)?;
    let options = cpt_data::input::ReadOptions { txt_split_on_blank_lines: true, jsonl_text_field: "text".to_string() };
    // Every file opens before training starts; unreadable records are skipped (prepare reports them).
    let readers =
        files.iter().map(|file| cpt_data::input::DocumentReader::open(file, &options)).collect::<Result<Vec<_>>>()?;
    let documents = readers.into_iter().flatten().filter_map(|item| match item {
        Ok(cpt_data::input::Item::Document { text, .. }) => Some(text),
        _ => None,
    });
    let added = train_new_tokens(&old, &base_vocab, documents, count, min_frequency)?;
    let config = &model.config;
    let first_id = (config.vocab_size as u32).max(base_vocab.values().max().map_or(0, |m| m + 1));
    let new = extended_tokenizer(json, &added, first_id)?;
    let vocab_size = first_id as usize + added.len();

    let params = model.load_params(DType::F32, &Device::Cpu)?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (name, var) in params.iter() {
        tensors.insert(name.to_string(), var.as_tensor().clone());
    }
    let mut rows = |name: &str| -> Result<()> {
        let table = tensors[name].clone();
        let mut grown = vec![table.clone()];
        if first_id as usize > config.vocab_size {
            grown.push(Tensor::zeros(
                (first_id as usize - config.vocab_size, config.hidden_size),
                DType::F32,
                &Device::Cpu,
            )?);
        }
        for (token, _) in &added {
            let id = new.token_to_id(token).context("an added token has no id")?;
            let text = new.decode(&[id], false).map_err(|e| anyhow::anyhow!("{e}"))?;
            let pieces = old.encode(text, false).map_err(|e| anyhow::anyhow!("{e}"))?.get_ids().to_vec();
            if pieces.is_empty() {
                bail!("the added token {token:?} has no pieces under the old tokenizer");
            }
            let pieces = Tensor::new(pieces.as_slice(), &Device::Cpu)?;
            grown.push(table.index_select(&pieces, 0)?.mean_keepdim(0)?);
        }
        tensors.insert(name.to_string(), Tensor::cat(&grown, 0)?);
        Ok(())
    };
    rows("model.embed_tokens.weight")?;
    if !config.tie_word_embeddings {
        rows("lm_head.weight")?;
    }
    let mut config_json = model.config_json.clone();
    config_json["vocab_size"] = Value::from(vocab_size);
    let new_config = crate::ModelConfig::from_json(&config_json)?;
    let params = Params::from_tensors(&new_config, tensors, DType::F32)?;
    let mut fertility_report = Vec::new();
    for path in texts {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        fertility_report.push(Fertility {
            text: path.display().to_string(),
            characters: text.chars().count(),
            before: fertility(&old, &text)?,
            after: fertility(&new, &text)?,
        });
    }
    let report = ExtensionReport {
        base_vocab_size: config.vocab_size,
        added_tokens: added.len(),
        vocab_size,
        fertility: fertility_report,
    };
    let mut extra = hf::passthrough_files(base)?;
    extra.push((REPORT_FILE.to_string(), serde_json::to_string_pretty(&report)?));
    let files = ModelFiles { config_json, params: &params, dtype: DType::F32, tokenizer: &new, extra };
    hf::write_model_dir(out, files)?;
    Ok(report)
}
