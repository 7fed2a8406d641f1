//! Drawing blocks from several datasets by weight (domain text plus replay of general text).

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::reader::{mix, Block, BlockStream, Cursor};

/// Everything needed to resume a mixture exactly.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MixtureState {
    /// Blocks drawn so far, over all sources.
    pub draws: u64,
    /// Per-source cursors, in the order the sources were given.
    pub cursors: Vec<Cursor>,
}

/// A weighted mixture of block streams. Draw `k` picks its source from `(seed, k)` alone, so the
/// sequence of blocks depends only on the seed and the state, never on how often it was resumed.
pub struct Mixture {
    sources: Vec<BlockStream>,
    /// Cumulative normalised weights; the last is 1.
    cumulative: Vec<f64>,
    seed: u64,
    draws: u64,
}

impl Mixture {
    /// `sources` with their weights; `state` resumes a previous mixture of the same sources.
    pub fn new(sources: Vec<(BlockStream, f64)>, seed: u64, state: Option<&MixtureState>) -> Result<Self> {
        if sources.is_empty() {
            bail!("a mixture needs at least one source");
        }
        let total: f64 = sources.iter().map(|(_, w)| w).sum();
        if !(total.is_finite() && total > 0.0) || sources.iter().any(|(_, w)| !(*w > 0.0)) {
            bail!("mixture weights must be positive");
        }
        let mut acc = 0.0;
        let cumulative = sources
            .iter()
            .map(|(_, w)| {
                acc += w / total;
                acc
            })
            .collect();
        let streams: Vec<BlockStream> = sources.into_iter().map(|(s, _)| s).collect();
        let mut mixture = Self { sources: streams, cumulative, seed, draws: 0 };
        if let Some(state) = state {
            mixture.restore(state)?;
        }
        Ok(mixture)
    }

    /// Moves every source and the draw count to `state` (of a mixture of the same sources).
    pub fn restore(&mut self, state: &MixtureState) -> Result<()> {
        if state.cursors.len() != self.sources.len() {
            bail!("the saved data state has {} sources, the spec has {}", state.cursors.len(), self.sources.len());
        }
        for (stream, cursor) in self.sources.iter_mut().zip(&state.cursors) {
            stream.cursor = *cursor;
        }
        self.draws = state.draws;
        Ok(())
    }

    /// The source index draw `k` comes from.
    fn source_of(&self, k: u64) -> usize {
        let u = (mix(self.seed ^ mix(k ^ 0x5EED)) >> 11) as f64 / (1u64 << 53) as f64;
        self.cumulative.iter().position(|&c| u < c).unwrap_or(self.cumulative.len() - 1)
    }

    /// The next block and the index of the source it came from.
    pub fn next_block(&mut self) -> (usize, Block) {
        let source = self.source_of(self.draws);
        self.draws += 1;
        (source, self.sources[source].next_block())
    }

    /// The state to save for an exact resume.
    pub fn state(&self) -> MixtureState {
        MixtureState { draws: self.draws, cursors: self.sources.iter().map(|s| s.cursor).collect() }
    }
}
