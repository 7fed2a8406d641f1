//! Text files to a dataset: read documents, clean, deduplicate, hold out a validation split,
//! tokenize and pack. Streams in batches, so memory is bounded by the batch and the dedup index.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use sha2::{Digest, Sha256};
use tokenizers::Tokenizer;

use crate::clean::Cleaner;
use crate::dedup::{Deduplicator, Verdict};
use crate::format::{Manifest, Split};
use crate::input::{input_files, DocumentReader, Item, ReadOptions};
use crate::reader::mix;
use crate::report::Report;
use crate::tokenize::DocumentTokenizer;
use crate::writer::{DatasetWriter, TokenizerInfo};

pub use cpt_protocol::prepare::PrepareConfig;

/// The split a document belongs to, decided by its text alone.
pub fn split_of(text: &str, validation_fraction: f64) -> Split {
    let digest = Sha256::digest(text.as_bytes());
    let hash = mix(u64::from_le_bytes(digest[..8].try_into().expect("8 bytes")));
    if ((hash >> 11) as f64 / (1u64 << 53) as f64) < validation_fraction {
        Split::Validation
    } else {
        Split::Train
    }
}

/// Cleans, deduplicates and tokenizes `inputs` with the tokenizer at `tokenizer_path` into a new
/// dataset at `out`. `progress` is called with the bytes read so far.
pub fn prepare(
    tokenizer_path: &Path,
    inputs: &[PathBuf],
    out: &Path,
    config: &PrepareConfig,
    mut progress: impl FnMut(u64),
) -> Result<(Manifest, Report)> {
    config.validate().map_err(|e| anyhow::anyhow!("the preparation config: {e}"))?;
    let tokenizer_bytes =
        std::fs::read(tokenizer_path).with_context(|| format!("reading {}", tokenizer_path.display()))?;
    let tokenizer = DocumentTokenizer::new(
        Tokenizer::from_bytes(&tokenizer_bytes)
            .map_err(|e| anyhow::anyhow!("loading tokenizer {}: {e}", tokenizer_path.display()))?,
    )?;
    let eos = eos_token_id(tokenizer.tokenizer(), tokenizer_path, config)?;
    let info = TokenizerInfo {
        sha256: format!("{:x}", Sha256::digest(&tokenizer_bytes)),
        vocab_size: tokenizer.tokenizer().get_vocab_size(true),
        eos_token_id: eos,
    };
    let files = input_files(inputs)?;
    if files.is_empty() {
        bail!("no .txt, .jsonl or .gz files among the inputs");
    }
    let read = ReadOptions {
        txt_split_on_blank_lines: config.txt_split_on_blank_lines,
        jsonl_text_field: config.jsonl_text_field.clone(),
    };
    let mut writer = DatasetWriter::create(out, config.seq_len, info)?;
    let cleaner = Cleaner::new(config.clean.clone())?;
    let mut dedup = Deduplicator::new(config.dedup.clone());
    let mut report = Report::default();
    let mut bytes_before = 0;
    for file in &files {
        report.files += 1;
        let mut reader = DocumentReader::open(file, &read)?;
        loop {
            let mut batch = Vec::with_capacity(config.batch_documents);
            for item in reader.by_ref().take(config.batch_documents.max(1)) {
                match item? {
                    Item::Document { text, origin } => batch.push((text, origin)),
                    Item::Bad { origin, reason } => report.bad_record(&origin, &reason),
                }
            }
            if batch.is_empty() {
                break;
            }
            let kept = filter_batch(batch, &cleaner, &mut dedup, &mut report);
            let texts: Vec<&str> = kept.iter().map(String::as_str).collect();
            let encodings = tokenizer.encode_batch(&texts).with_context(|| format!("tokenizing {}", file.display()))?;
            for (text, ids) in kept.iter().zip(encodings) {
                writer.push_document(split_of(text, config.validation_fraction), &ids)?;
            }
            progress(bytes_before + reader.bytes_read);
        }
        bytes_before += reader.bytes_read;
    }
    report.bytes_read = bytes_before;
    let sources = inputs.iter().map(|p| p.display().to_string()).collect();
    let manifest = writer.finish(config.tail, sources, serde_json::to_value(&report)?)?;
    Ok((manifest, report))
}

/// The end-of-text token: the configured one, else the first of the usual names in the vocabulary.
fn eos_token_id(tokenizer: &Tokenizer, path: &Path, config: &PrepareConfig) -> Result<u32> {
    match &config.eos_token {
        Some(token) => {
            tokenizer.token_to_id(token).with_context(|| format!("`eos_token` {token} is not in the vocabulary"))
        }
        None => ["<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>"]
            .iter()
            .find_map(|t| tokenizer.token_to_id(t))
            .with_context(|| format!("{}: no end-of-text token found; set `eos_token`", path.display())),
    }
}

/// Cleans a batch in parallel, then deduplicates it in order; returns the kept texts.
fn filter_batch(
    batch: Vec<(String, String)>,
    cleaner: &Cleaner,
    dedup: &mut Deduplicator,
    report: &mut Report,
) -> Vec<String> {
    let index = &*dedup;
    let cleaned: Vec<_> = batch
        .into_par_iter()
        .map(|(text, origin)| {
            let cleaned = cleaner.clean(&text);
            let fingerprint = cleaned.outcome.as_ref().ok().map(|t| index.fingerprint(t));
            (text, origin, cleaned, fingerprint)
        })
        .collect();
    let mut kept = Vec::new();
    for (original, origin, cleaned, fingerprint) in cleaned {
        report.documents_read += 1;
        report.chars_read += original.chars().count() as u64;
        for (rule, line) in &cleaned.removed_lines {
            report.line_removed(rule, &origin, line);
        }
        let text = match cleaned.outcome {
            Ok(text) => text,
            Err(rule) => {
                report.document_removed(rule, &origin, &original);
                continue;
            }
        };
        match dedup.check(&fingerprint.expect("kept documents are fingerprinted")) {
            Verdict::ExactDuplicate => report.document_removed("exact_duplicate", &origin, &text),
            Verdict::NearDuplicate => report.document_removed("near_duplicate", &origin, &text),
            Verdict::Unique => {
                report.documents_kept += 1;
                report.chars_kept += text.chars().count() as u64;
                kept.push(text);
            }
        }
    }
    kept
}
