//! Reading blocks: O(1) random access by mmap, a shuffled order per (seed, epoch) that is computed
//! per position rather than stored, and a cursor that resumes in O(1).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use serde::{Deserialize, Serialize};

use crate::format::{Manifest, Split, TokenWidth, FORMAT_VERSION};
pub use crate::hash::mix;

/// One split of a dataset, memory-mapped.
pub struct SplitReader {
    seq_len: usize,
    width: TokenWidth,
    shards: Vec<Mmap>,
    /// `starts[i]` is the first block of shard `i`; the last entry is the total.
    starts: Vec<u64>,
    /// Padding tokens at the end of the last block.
    padded: u64,
}

/// Reads `manifest.json` of a dataset directory.
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let manifest: Manifest = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    if manifest.format_version != FORMAT_VERSION {
        bail!("{}: format version {} (this cpt reads {FORMAT_VERSION})", path.display(), manifest.format_version);
    }
    Ok(manifest)
}

impl SplitReader {
    /// Maps the shards of `split` of the dataset at `dir`, checking their sizes against the manifest.
    pub fn open(dir: &Path, split: Split) -> Result<Self> {
        let manifest = read_manifest(dir)?;
        let info =
            manifest.splits.get(&split).with_context(|| format!("{}: no {} split", dir.display(), split.name()))?;
        let block_bytes = (manifest.seq_len * manifest.token_width.bytes()) as u64;
        let mut shards = Vec::new();
        let mut starts = vec![0];
        for shard in &info.shards {
            let path: PathBuf = dir.join(&shard.file);
            let file = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
            let length = file.metadata()?.len();
            if length != shard.blocks * block_bytes {
                bail!("{}: {length} bytes, the manifest says {} blocks of {block_bytes}", path.display(), shard.blocks);
            }
            // Safety: shards are written once, renamed into place, and never modified afterwards.
            shards.push(unsafe { Mmap::map(&file) }.with_context(|| format!("mapping {}", path.display()))?);
            starts.push(starts.last().unwrap() + shard.blocks);
        }
        Ok(Self { seq_len: manifest.seq_len, width: manifest.token_width, shards, starts, padded: info.padded_tokens })
    }

    pub fn len(&self) -> u64 {
        *self.starts.last().unwrap()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Tokens of block `index` that are real text; the rest (only ever at the end of the last
    /// block of a padded split) is padding to mask out of the loss.
    pub fn valid_tokens(&self, index: u64) -> usize {
        if index + 1 == self.len() {
            self.seq_len - self.padded as usize
        } else {
            self.seq_len
        }
    }

    /// The tokens of block `index`.
    pub fn block(&self, index: u64) -> Vec<u32> {
        assert!(index < self.len(), "block {index} of {}", self.len());
        let shard = self.starts.partition_point(|&start| start <= index) - 1;
        let local = (index - self.starts[shard]) as usize;
        let bytes = self.width.bytes();
        let data = &self.shards[shard][local * self.seq_len * bytes..(local + 1) * self.seq_len * bytes];
        match self.width {
            TokenWidth::U16 => data.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]]) as u32).collect(),
            TokenWidth::U32 => data.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        }
    }
}

/// Position `index` of a pseudo-random permutation of `0..n` keyed by `key`.
///
/// A four-round Feistel network on the smallest even-bit domain ≥ n, with cycle walking back into
/// `0..n`: a bijection computed in O(1) per position, so no order is stored and resuming needs
/// no replay.
pub fn permute(index: u64, n: u64, key: u64) -> u64 {
    assert!(index < n, "index {index} out of {n}");
    if n <= 1 {
        return index;
    }
    let bits = (64 - (n - 1).leading_zeros()).max(2).div_ceil(2);
    let mask = (1u64 << bits) - 1;
    let mut x = index;
    loop {
        let (mut left, mut right) = (x >> bits, x & mask);
        for round in 0..4u64 {
            let f = mix(right ^ mix(key ^ round)) & mask;
            (left, right) = (right, left ^ f);
        }
        x = (left << bits) | right;
        if x < n {
            return x;
        }
    }
}

/// One block and how many of its tokens are text (the rest is padding).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    pub tokens: Vec<u32>,
    pub valid: usize,
}

/// Where a reader is in its stream of blocks: everything needed to resume.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub epoch: u64,
    /// Blocks already read in this epoch.
    pub position: u64,
}

/// An endless stream of a split's blocks: every block once per epoch, in a fresh shuffled order
/// each epoch, determined by `(seed, epoch)`.
pub struct BlockStream {
    reader: SplitReader,
    seed: u64,
    pub cursor: Cursor,
}

impl BlockStream {
    pub fn new(reader: SplitReader, seed: u64, cursor: Cursor) -> Result<Self> {
        if reader.is_empty() {
            bail!("the split has no complete block; use more text or a smaller seq_len");
        }
        Ok(Self { reader, seed, cursor })
    }

    /// The block index the cursor points at, without moving.
    pub fn peek_index(&self) -> u64 {
        permute(self.cursor.position, self.reader.len(), mix(self.seed ^ mix(self.cursor.epoch)))
    }

    /// The next block; the cursor moves past it.
    pub fn next_block(&mut self) -> Block {
        let index = self.peek_index();
        let block = Block { tokens: self.reader.block(index), valid: self.reader.valid_tokens(index) };
        self.cursor.position += 1;
        if self.cursor.position == self.reader.len() {
            self.cursor = Cursor { epoch: self.cursor.epoch + 1, position: 0 };
        }
        block
    }

    pub fn reader(&self) -> &SplitReader {
        &self.reader
    }
}
