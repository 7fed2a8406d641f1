//! The data a run reads: a weighted mixture of training sources and fixed held-out eval sets.

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use cpt_data::reader::{mix, read_manifest};
use cpt_data::{Block, BlockStream, Cursor, Mixture, MixtureState, Split, SplitReader};
use cpt_protocol::{JobSpec, WarningCode};

use crate::config::ModelConfig;

/// A named held-out set: the first `eval_blocks` blocks of a dataset's validation split, in index
/// order, so every evaluation of a run scores exactly the same tokens.
pub struct EvalSet {
    pub name: String,
    pub blocks: Vec<Block>,
    /// UTF-8 bytes of the text its predicted tokens decode to (see [`EvalSet::count_bytes`]).
    pub bytes: u64,
}

impl EvalSet {
    /// Sets `bytes` from the decoded predicted tokens of every block (special tokens skipped), for
    /// bits per byte.
    pub fn count_bytes(&mut self, tokenizer: &tokenizers::Tokenizer) -> Result<()> {
        let mut bytes = 0;
        for block in &self.blocks {
            let predicted = &block.tokens[1.min(block.valid)..block.valid];
            let text = tokenizer.decode(predicted, true).map_err(|e| anyhow::anyhow!("decoding {}: {e}", self.name))?;
            bytes += text.len() as u64;
        }
        self.bytes = bytes;
        Ok(())
    }
}

/// A micro-batch: ids `(batch, seq_len)` and, when a block is padded, the loss mask
/// `(batch, seq_len - 1)` over target positions.
pub struct Batch {
    pub ids: Tensor,
    pub mask: Option<Tensor>,
    /// Target positions that count: `batch · (seq_len - 1)` less the padded ones.
    pub predicted: u64,
}

/// Stacks blocks into a [`Batch`].
pub fn batch(blocks: &[Block], device: &Device) -> Result<Batch> {
    let seq_len = blocks[0].tokens.len();
    let ids: Vec<u32> = blocks.iter().flat_map(|b| b.tokens.iter().copied()).collect();
    let ids = Tensor::from_vec(ids, (blocks.len(), seq_len), device)?;
    let predicted: u64 = blocks.iter().map(|b| b.valid.saturating_sub(1) as u64).sum();
    let mask = if blocks.iter().all(|b| b.valid == seq_len) {
        None
    } else {
        let values: Vec<f32> =
            blocks.iter().flat_map(|b| (1..seq_len).map(move |t| if t < b.valid { 1.0 } else { 0.0 })).collect();
        Some(Tensor::from_vec(values, (blocks.len(), seq_len - 1), device)?)
    };
    Ok(Batch { ids, mask, predicted })
}

/// Training and evaluation data of a run.
pub struct TrainData {
    pub mixture: Mixture,
    pub eval_sets: Vec<EvalSet>,
    /// Notes worth a warning (e.g. a tokenizer that differs from the model's).
    pub notes: Vec<(WarningCode, String)>,
}

fn check_dataset(
    dir: &Path,
    spec: &JobSpec,
    config: &ModelConfig,
    tokenizer_sha256: &str,
    notes: &mut Vec<(WarningCode, String)>,
) -> Result<()> {
    let manifest = read_manifest(dir)?;
    if manifest.seq_len != spec.seq_len {
        bail!("{}: blocks of {} tokens, the spec's seq_len is {}", dir.display(), manifest.seq_len, spec.seq_len);
    }
    if manifest.vocab_size > config.vocab_size {
        bail!(
            "{}: tokenizer vocabulary {} exceeds the model's {}",
            dir.display(),
            manifest.vocab_size,
            config.vocab_size
        );
    }
    if manifest.tokenizer_sha256 != tokenizer_sha256 {
        notes.push((
            WarningCode::TokenizerMismatch,
            format!(
                "{} was tokenized with a tokenizer.json (sha256 {}) that differs from the model's ({tokenizer_sha256})",
                dir.display(),
                manifest.tokenizer_sha256
            ),
        ));
    }
    Ok(())
}

impl TrainData {
    /// Opens the spec's datasets; `state` resumes the mixture where a checkpoint left it.
    pub fn open(
        spec: &JobSpec,
        config: &ModelConfig,
        tokenizer_sha256: &str,
        state: Option<&MixtureState>,
    ) -> Result<Self> {
        let mut notes = Vec::new();
        let mut sources = Vec::new();
        for (i, source) in spec.train_data.iter().enumerate() {
            let dir = Path::new(&source.dataset);
            check_dataset(dir, spec, config, tokenizer_sha256, &mut notes)
                .with_context(|| format!("train_data[{i}]"))?;
            let reader = SplitReader::open(dir, Split::Train).with_context(|| format!("train_data[{i}]"))?;
            // Each source gets its own shuffle key so equal datasets are not read in lockstep.
            let stream = BlockStream::new(reader, mix(spec.seed ^ mix(i as u64 + 1)), Cursor::default())
                .with_context(|| format!("train_data[{i}]: {}", dir.display()))?;
            sources.push((stream, source.weight));
        }
        let mixture = Mixture::new(sources, spec.seed, state)?;
        let mut eval_sets = Vec::new();
        for (name, dataset) in &spec.eval_data {
            let dir = Path::new(dataset);
            check_dataset(dir, spec, config, tokenizer_sha256, &mut notes)
                .with_context(|| format!("eval_data.{name}"))?;
            let reader = SplitReader::open(dir, Split::Validation).with_context(|| format!("eval_data.{name}"))?;
            if reader.is_empty() {
                bail!("eval_data.{name}: {} has no validation blocks", dir.display());
            }
            let count = reader.len().min(spec.eval_blocks as u64);
            eval_sets.push(EvalSet {
                bytes: 0,
                name: name.clone(),
                blocks: (0..count).map(|i| Block { tokens: reader.block(i), valid: reader.valid_tokens(i) }).collect(),
            });
        }
        Ok(Self { mixture, eval_sets, notes })
    }

    /// The next micro-batch of `micro_batch_size` blocks from the mixture.
    pub fn next_batch(&mut self, micro_batch_size: usize, device: &Device) -> Result<Batch> {
        let blocks: Vec<Block> = (0..micro_batch_size).map(|_| self.mixture.next_block().1).collect();
        batch(&blocks, device)
    }
}
