//! A HuggingFace `tokenizer.json` rebuilt from GGUF tokenizer metadata.
//!
//! Two families: byte-level BPE (`tokenizer.ggml.model = "gpt2"`, with merges; the pre-tokenizer is
//! chosen by `tokenizer.ggml.pre`) and SentencePiece BPE (`"llama"`, scores and byte-fallback
//! tokens; merges are derived from the vocabulary as transformers' converter does).

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tokenizers::Tokenizer;

use super::Metadata;

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const TOKEN_UNKNOWN: i32 = 2;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;

const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_PATTERN: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn byte_level(use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

/// The pre-tokenizer that matches llama.cpp's `tokenizer.ggml.pre` name.
fn bpe_pre_tokenizer(pre: &str) -> Result<Value> {
    let split = |pattern: &str| {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
            byte_level(false),
        ]})
    };
    Ok(match pre {
        "default" | "gpt2" | "gpt-2" => byte_level(true),
        "smollm" | "starcoder" | "refact" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            byte_level(true),
        ]}),
        "llama-bpe" | "llama3" | "smaug-bpe" => split(LLAMA3_PATTERN),
        "qwen2" => split(QWEN2_PATTERN),
        other => bail!(
            "GGUF `tokenizer.ggml.pre` = `{other}` is not supported (supported: default, gpt2, smollm, starcoder, refact, llama-bpe, qwen2)"
        ),
    })
}

fn strings(meta: &Metadata, key: &str) -> Result<Vec<String>> {
    meta.array(key)?
        .iter()
        .map(|v| Ok(v.to_string().with_context(|| format!("`{key}` holds a non-string"))?.clone()))
        .collect()
}

fn token_types(meta: &Metadata, count: usize) -> Result<Vec<i32>> {
    match meta.get("tokenizer.ggml.token_type") {
        None => Ok(vec![1; count]),
        Some(_) => meta
            .array("tokenizer.ggml.token_type")?
            .iter()
            .map(|v| v.to_i32().context("`tokenizer.ggml.token_type` holds a non-integer"))
            .collect(),
    }
}

fn added_tokens(tokens: &[String], types: &[i32]) -> Vec<Value> {
    tokens
        .iter()
        .zip(types)
        .enumerate()
        .filter(|(_, (_, t))| matches!(**t, TOKEN_UNKNOWN | TOKEN_CONTROL | TOKEN_USER_DEFINED))
        .map(|(id, (content, t))| {
            json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": *t == TOKEN_USER_DEFINED, "special": *t != TOKEN_USER_DEFINED})
        })
        .collect()
}

/// Adds BOS in front of every sequence, as the model was trained, when the metadata asks for it.
fn post_processor(tokens: &[String], bos: Option<u32>, add_bos: bool, fallback: Value) -> Result<Value> {
    match (add_bos, bos) {
        (true, Some(id)) => {
            let bos = tokens.get(id as usize).context("`tokenizer.ggml.bos_token_id` is out of range")?;
            Ok(json!({
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos.clone(): {"id": bos, "ids": [id], "tokens": [bos]}},
            }))
        }
        (true, None) => bail!("`tokenizer.ggml.add_bos_token` is true but `tokenizer.ggml.bos_token_id` is missing"),
        (false, _) => Ok(fallback),
    }
}

fn vocab_map(tokens: &[String]) -> serde_json::Map<String, Value> {
    tokens.iter().enumerate().map(|(id, t)| (t.clone(), Value::from(id))).collect()
}

/// SentencePiece merges: every split of a vocabulary piece into two vocabulary pieces, ranked by the
/// merged piece's score, then by the ids of its halves (transformers' `SentencePieceExtractor`).
fn sentencepiece_merges(tokens: &[String], scores: &[f32], types: &[i32]) -> Vec<Value> {
    let ids: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    let mut merges: Vec<(f32, usize, usize, usize)> = Vec::new();
    for (merged, piece) in tokens.iter().enumerate() {
        if types[merged] != 1 {
            continue;
        }
        for (split, _) in piece.char_indices().skip(1) {
            if let (Some(&l), Some(&r)) = (ids.get(&piece[..split]), ids.get(&piece[split..])) {
                merges.push((scores[merged], merged, l, r));
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)).then(a.3.cmp(&b.3)));
    merges.into_iter().map(|(_, _, l, r)| json!([tokens[l], tokens[r]])).collect()
}

/// Builds the tokenizer described by the GGUF metadata.
pub(crate) fn from_metadata(meta: &Metadata) -> Result<Tokenizer> {
    let model = meta.string("tokenizer.ggml.model")?;
    let tokens = strings(meta, "tokenizer.ggml.tokens")?;
    let types = token_types(meta, tokens.len())?;
    if types.len() != tokens.len() {
        bail!("`tokenizer.ggml.token_type` has {} entries for {} tokens", types.len(), tokens.len());
    }
    let bos = meta.optional_u32("tokenizer.ggml.bos_token_id")?;
    let add_bos_default = model == "llama";
    let add_bos = match meta.get("tokenizer.ggml.add_bos_token") {
        Some(v) => v.to_bool().context("`tokenizer.ggml.add_bos_token` is not a bool")?,
        None => add_bos_default,
    };
    let json = match model {
        "gpt2" => {
            let pre = match meta.get("tokenizer.ggml.pre") {
                Some(_) => meta.string("tokenizer.ggml.pre")?,
                None => "default",
            };
            let merges: Vec<Value> = strings(meta, "tokenizer.ggml.merges")?.into_iter().map(Value::from).collect();
            json!({
                "version": "1.0", "truncation": null, "padding": null,
                "added_tokens": added_tokens(&tokens, &types),
                "normalizer": null,
                "pre_tokenizer": bpe_pre_tokenizer(pre)?,
                "post_processor": post_processor(&tokens, bos, add_bos,
                    json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true}))?,
                "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                          "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                          "vocab": vocab_map(&tokens), "merges": merges},
            })
        }
        "llama" => {
            let scores: Vec<f32> = meta
                .array("tokenizer.ggml.scores")?
                .iter()
                .map(|v| v.to_f32().context("`tokenizer.ggml.scores` holds a non-float"))
                .collect::<Result<_>>()?;
            if scores.len() != tokens.len() {
                bail!("`tokenizer.ggml.scores` has {} entries for {} tokens", scores.len(), tokens.len());
            }
            let unk = meta.optional_u32("tokenizer.ggml.unknown_token_id")?.and_then(|id| tokens.get(id as usize));
            json!({
                "version": "1.0", "truncation": null, "padding": null,
                "added_tokens": added_tokens(&tokens, &types),
                "normalizer": {"type": "Sequence", "normalizers": [
                    {"type": "Prepend", "prepend": "▁"},
                    {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
                ]},
                "pre_tokenizer": null,
                "post_processor": post_processor(&tokens, bos, add_bos, Value::Null)?,
                "decoder": {"type": "Sequence", "decoders": [
                    {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                    {"type": "ByteFallback"},
                    {"type": "Fuse"},
                    {"type": "Strip", "content": " ", "start": 1, "stop": 0},
                ]},
                "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                          "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                          "vocab": vocab_map(&tokens), "merges": sentencepiece_merges(&tokens, &scores, &types)},
            })
        }
        other => bail!("GGUF `tokenizer.ggml.model` = `{other}` is not supported (supported: gpt2, llama)"),
    };
    let text = serde_json::to_string(&json)?;
    text.parse::<Tokenizer>().map_err(|e| anyhow::anyhow!("the rebuilt tokenizer.json does not load: {e}"))
}
