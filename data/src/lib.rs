//! cpt's data pipeline: token shards on disk ([`format`], [`writer`]), a memory-mapped reader with
//! shuffled, resumable block streams ([`reader`]), weighted mixtures of datasets ([`mixture`]),
//! and text preparation ([`prepare`]: [`input`], [`clean`], [`dedup`], [`report`]). No candle, no async.

pub mod clean;
pub mod dedup;
pub mod format;
pub mod hash;
pub mod input;
pub mod mixture;
pub mod prepare;
pub mod reader;
pub mod report;
pub mod staged;
pub mod tokenize;
pub mod writer;

pub use format::{Manifest, Split};
pub use mixture::{Mixture, MixtureState};
pub use reader::{Block, BlockStream, Cursor, SplitReader};
pub use staged::{sha256_file, StagedDir};
pub use writer::{DatasetWriter, TokenizerInfo};
