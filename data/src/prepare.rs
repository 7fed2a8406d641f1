//! Text files to a dataset: read documents, hold out a validation split, tokenize, pack.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokenizers::Tokenizer;

use crate::format::{Manifest, Split};
use crate::reader::mix;
use crate::writer::{DatasetWriter, TokenizerInfo};

/// How text becomes documents.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrepareConfig {
    pub seq_len: usize,
    /// Fraction of documents held out for validation, chosen by a hash of the document's text.
    pub validation_fraction: f64,
    /// `.txt` files: one document per blank-line-separated paragraph group (true) or per file.
    pub txt_split_on_blank_lines: bool,
    /// `.jsonl` files: the field holding the text.
    pub jsonl_text_field: String,
    /// Documents per tokenizer batch.
    pub batch_documents: usize,
}

impl Default for PrepareConfig {
    fn default() -> Self {
        Self {
            seq_len: 2048,
            validation_fraction: 0.005,
            txt_split_on_blank_lines: true,
            jsonl_text_field: "text".into(),
            batch_documents: 256,
        }
    }
}

/// Counts a preparation reports besides the manifest's.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PrepareStats {
    pub files: u64,
    pub bytes_read: u64,
    pub documents_read: u64,
    pub empty_documents: u64,
    /// Records that could not be read (invalid UTF-8, broken JSON), as `file:line: reason`.
    pub bad_records: Vec<String>,
}

/// Expands files and directories (recursively) into `.txt` and `.jsonl` files, sorted.
pub fn input_files(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut pending: Vec<PathBuf> = inputs.to_vec();
    while let Some(path) = pending.pop() {
        let metadata = std::fs::metadata(&path).with_context(|| format!("reading {}", path.display()))?;
        if metadata.is_dir() {
            for entry in std::fs::read_dir(&path).with_context(|| format!("listing {}", path.display()))? {
                pending.push(entry?.path());
            }
        } else if matches!(path.extension().and_then(|e| e.to_str()), Some("txt" | "jsonl")) {
            files.push(path);
        } else if inputs.contains(&path) {
            bail!("{}: only .txt and .jsonl files are read", path.display());
        }
    }
    files.sort();
    Ok(files)
}

/// Documents of one file, with bad records noted in `stats`.
fn read_documents(path: &Path, config: &PrepareConfig, stats: &mut PrepareStats) -> Result<Vec<String>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let jsonl = path.extension().is_some_and(|e| e == "jsonl");
    let mut documents = Vec::new();
    let mut current = String::new();
    for (number, line) in BufReader::new(file).split(b'\n').enumerate() {
        let bytes = line.with_context(|| format!("reading {}", path.display()))?;
        stats.bytes_read += bytes.len() as u64 + 1;
        let Ok(line) = String::from_utf8(bytes) else {
            stats.bad_records.push(format!("{}:{}: invalid UTF-8", path.display(), number + 1));
            continue;
        };
        if jsonl {
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<serde_json::Value>(&line) {
                Ok(value) => match value.get(&config.jsonl_text_field).and_then(|t| t.as_str()) {
                    Some(text) => documents.push(text.to_string()),
                    None => stats.bad_records.push(format!(
                        "{}:{}: no string field `{}`",
                        path.display(),
                        number + 1,
                        config.jsonl_text_field
                    )),
                },
                Err(e) => stats.bad_records.push(format!("{}:{}: {e}", path.display(), number + 1)),
            }
        } else if config.txt_split_on_blank_lines && line.trim().is_empty() {
            if !current.trim().is_empty() {
                documents.push(std::mem::take(&mut current));
            }
            current.clear();
        } else {
            if !current.is_empty() {
                current.push('\n');
            }
            current.push_str(line.trim_end_matches('\r'));
        }
    }
    if !current.trim().is_empty() {
        documents.push(current);
    }
    Ok(documents)
}

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

/// Tokenizes `inputs` with the tokenizer at `tokenizer_path` into a new dataset at `out`.
pub fn prepare(
    tokenizer_path: &Path,
    inputs: &[PathBuf],
    out: &Path,
    config: &PrepareConfig,
    mut progress: impl FnMut(u64),
) -> Result<(Manifest, PrepareStats)> {
    let tokenizer_bytes =
        std::fs::read(tokenizer_path).with_context(|| format!("reading {}", tokenizer_path.display()))?;
    let tokenizer = Tokenizer::from_bytes(&tokenizer_bytes)
        .map_err(|e| anyhow::anyhow!("loading tokenizer {}: {e}", tokenizer_path.display()))?;
    let eos = ["<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>"]
        .iter()
        .find_map(|t| tokenizer.token_to_id(t))
        .with_context(|| format!("{}: no end-of-text token found", tokenizer_path.display()))?;
    let info = TokenizerInfo {
        sha256: format!("{:x}", Sha256::digest(&tokenizer_bytes)),
        vocab_size: tokenizer.get_vocab_size(true),
        eos_token_id: eos,
    };
    let files = input_files(inputs)?;
    if files.is_empty() {
        bail!("no .txt or .jsonl files among the inputs");
    }
    let mut writer = DatasetWriter::create(out, config.seq_len, info)?;
    let mut stats = PrepareStats::default();
    for file in &files {
        stats.files += 1;
        let documents = read_documents(file, config, &mut stats)?;
        for batch in documents.chunks(config.batch_documents.max(1)) {
            let encodings = tokenizer
                .encode_batch(batch.to_vec(), true)
                .map_err(|e| anyhow::anyhow!("tokenizing {}: {e}", file.display()))?;
            for (text, encoding) in batch.iter().zip(encodings) {
                stats.documents_read += 1;
                if encoding.get_ids().is_empty() {
                    stats.empty_documents += 1;
                    continue;
                }
                writer.push_document(split_of(text, config.validation_fraction), encoding.get_ids())?;
            }
        }
        progress(stats.bytes_read);
    }
    let sources = inputs.iter().map(|p| p.display().to_string()).collect();
    let manifest = writer.finish(sources, serde_json::to_value(&stats)?)?;
    Ok((manifest, stats))
}
