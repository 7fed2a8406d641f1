//! Packing tokenized documents into a dataset directory.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::format::{Manifest, Shard, Split, SplitInfo, TailPolicy, TokenWidth, FORMAT_VERSION};
use crate::staged::StagedDir;

/// Blocks per shard file: 65,536 blocks of 2,048 u16 tokens is 256 MiB.
const BLOCKS_PER_SHARD: u64 = 1 << 16;

struct OpenShard {
    file: BufWriter<File>,
    hasher: Sha256,
    name: String,
    blocks: u64,
}

struct SplitWriter {
    split: Split,
    pending: Vec<u32>,
    info: SplitInfo,
    shard: Option<OpenShard>,
}

/// What the dataset's tokens mean.
#[derive(Debug, Clone)]
pub struct TokenizerInfo {
    pub sha256: String,
    pub vocab_size: usize,
    pub eos_token_id: u32,
}

/// Writes a dataset into a staging directory and renames it into place on [`DatasetWriter::finish`],
/// so a dataset directory is either complete or absent.
pub struct DatasetWriter {
    staged: StagedDir,
    seq_len: usize,
    width: TokenWidth,
    tokenizer: TokenizerInfo,
    splits: BTreeMap<Split, SplitWriter>,
}

impl DatasetWriter {
    /// Starts a dataset at `out`, which must not exist.
    pub fn create(out: &Path, seq_len: usize, tokenizer: TokenizerInfo) -> Result<Self> {
        if seq_len < 2 {
            bail!("seq_len must be at least 2, got {seq_len}");
        }
        let staged = StagedDir::begin(out)?;
        let splits = [Split::Train, Split::Validation]
            .into_iter()
            .map(|split| (split, SplitWriter { split, pending: Vec::new(), info: SplitInfo::default(), shard: None }))
            .collect();
        Ok(Self { staged, seq_len, width: TokenWidth::for_vocab(tokenizer.vocab_size), tokenizer, splits })
    }

    /// Appends one tokenized document (EOS is added after it) to `split`.
    pub fn push_document(&mut self, split: Split, tokens: &[u32]) -> Result<()> {
        if let Some(bad) = tokens.iter().find(|&&t| t as usize >= self.tokenizer.vocab_size) {
            bail!("token id {bad} is outside the vocabulary of {}", self.tokenizer.vocab_size);
        }
        let (seq_len, width, dir) = (self.seq_len, self.width, self.staged.path());
        let writer = self.splits.get_mut(&split).expect("both splits exist");
        writer.info.documents += 1;
        writer.info.tokens += tokens.len() as u64 + 1;
        writer.pending.extend_from_slice(tokens);
        writer.pending.push(self.tokenizer.eos_token_id);
        let full = writer.pending.len() / seq_len * seq_len;
        let blocks: Vec<u32> = writer.pending.drain(..full).collect();
        for block in blocks.chunks(seq_len) {
            writer.write_block(block, width, dir)?;
        }
        Ok(())
    }

    /// Closes the shards, writes `manifest.json` and moves the dataset into place.
    pub fn finish(mut self, tail: TailPolicy, sources: Vec<String>, stats: serde_json::Value) -> Result<Manifest> {
        let mut splits = BTreeMap::new();
        for (split, mut writer) in std::mem::take(&mut self.splits) {
            let pending = std::mem::take(&mut writer.pending);
            match tail {
                TailPolicy::Pad if !pending.is_empty() => {
                    let mut block = pending;
                    writer.info.padded_tokens = (self.seq_len - block.len()) as u64;
                    block.resize(self.seq_len, self.tokenizer.eos_token_id);
                    writer.write_block(&block, self.width, self.staged.path())?;
                }
                _ => writer.info.dropped_tail_tokens = pending.len() as u64,
            }
            writer.close_shard()?;
            splits.insert(split, writer.info);
        }
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            seq_len: self.seq_len,
            token_width: self.width,
            tokenizer_sha256: self.tokenizer.sha256.clone(),
            vocab_size: self.tokenizer.vocab_size,
            eos_token_id: self.tokenizer.eos_token_id,
            splits,
            sources,
            stats,
        };
        self.staged.write("manifest.json", serde_json::to_string_pretty(&manifest)?)?;
        self.staged.commit()?;
        Ok(manifest)
    }
}

impl SplitWriter {
    fn write_block(&mut self, block: &[u32], width: TokenWidth, dir: &Path) -> Result<()> {
        if self.shard.as_ref().is_some_and(|s| s.blocks == BLOCKS_PER_SHARD) {
            self.close_shard()?;
        }
        if self.shard.is_none() {
            let name = format!("{}-{:05}.tokens", self.split.name(), self.info.shards.len());
            let file = File::create(dir.join(&name)).with_context(|| format!("creating shard {name}"))?;
            self.shard = Some(OpenShard { file: BufWriter::new(file), hasher: Sha256::new(), name, blocks: 0 });
        }
        let shard = self.shard.as_mut().expect("opened above");
        let mut bytes = Vec::with_capacity(block.len() * width.bytes());
        for &token in block {
            match width {
                TokenWidth::U16 => bytes.extend_from_slice(&(token as u16).to_le_bytes()),
                TokenWidth::U32 => bytes.extend_from_slice(&token.to_le_bytes()),
            }
        }
        shard.file.write_all(&bytes)?;
        shard.hasher.update(&bytes);
        shard.blocks += 1;
        self.info.blocks += 1;
        Ok(())
    }

    fn close_shard(&mut self) -> Result<()> {
        if let Some(shard) = self.shard.take() {
            let file = shard.file.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
            let sha256 = format!("{:x}", shard.hasher.finalize());
            self.info.shards.push(Shard { file: shard.name, blocks: shard.blocks, sha256 });
        }
        Ok(())
    }
}
