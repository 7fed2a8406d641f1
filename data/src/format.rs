//! The on-disk dataset format.
//!
//! ```text
//! <dataset>/manifest.json          format version, tokenizer, seq_len, counts, shards with sha256
//! <dataset>/train-00000.tokens     blocks of seq_len little-endian u16 (vocab ≤ 65536) or u32 tokens
//! <dataset>/validation-00000.tokens
//! ```
//!
//! Documents are concatenated, each followed by EOS, and cut into blocks of exactly `seq_len`
//! tokens; the incomplete tail is dropped, or padded with EOS and recorded as `padded_tokens` so
//! that training masks it. Block `i` of a split starts at byte
//! `i · seq_len · token_bytes` of the concatenated shards.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The version this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// Width of one stored token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenWidth {
    U16,
    U32,
}

impl TokenWidth {
    /// The narrowest width that holds every id of a vocabulary.
    pub fn for_vocab(vocab_size: usize) -> Self {
        if vocab_size <= 1 << 16 {
            TokenWidth::U16
        } else {
            TokenWidth::U32
        }
    }

    pub fn bytes(self) -> usize {
        match self {
            TokenWidth::U16 => 2,
            TokenWidth::U32 => 4,
        }
    }
}

pub use cpt_protocol::prepare::TailPolicy;

/// The two splits every dataset has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Validation,
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Validation => "validation",
        }
    }
}

/// One shard file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Shard {
    pub file: String,
    pub blocks: u64,
    pub sha256: String,
}

/// Counts and files of one split.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SplitInfo {
    pub documents: u64,
    /// Tokens of the kept documents, EOS separators included, before cutting into blocks.
    pub tokens: u64,
    pub blocks: u64,
    /// Tokens in the dropped incomplete tail (tail policy `drop`).
    pub dropped_tail_tokens: u64,
    /// EOS tokens padding the last block (tail policy `pad`); they are masked out of the loss.
    #[serde(default)]
    pub padded_tokens: u64,
    pub shards: Vec<Shard>,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub seq_len: usize,
    pub token_width: TokenWidth,
    pub tokenizer_sha256: String,
    pub vocab_size: usize,
    pub eos_token_id: u32,
    pub splits: BTreeMap<Split, SplitInfo>,
    /// Input paths the dataset was made from.
    pub sources: Vec<String>,
    /// Preparation statistics (filters, duplicates, bad records), as the preparer reports them.
    #[serde(default)]
    pub stats: serde_json::Value,
}
