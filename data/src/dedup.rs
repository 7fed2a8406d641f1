//! Deduplication: exact (hash of the normalised text) and near-duplicate (MinHash signatures over
//! shingles, banded into LSH buckets). Signatures are computed in parallel; the index decides in
//! document order, so the first occurrence is the one kept.

use rustc_hash::FxHashSet;
use sha2::{Digest, Sha256};

use crate::clean::is_cjk;
use crate::hash::{hash_str, mix};

pub use cpt_protocol::prepare::DedupConfig;

/// The LSH banding `(bands, rows)` that uses at least 90% of `num_perm` and whose S-curve
/// threshold `(1/bands)^(1/rows)` is closest to `threshold`. Using (nearly) all permutations keeps
/// the curve steep: few pairs well below the threshold collide in a band.
pub fn lsh_bands(threshold: f64, num_perm: usize) -> (usize, usize) {
    let num_perm = num_perm.max(1);
    (1..=num_perm)
        .map(|rows| (num_perm / rows, rows))
        .filter(|&(bands, rows)| bands > 0 && bands * rows * 10 >= num_perm * 9)
        .min_by(|a, b| {
            let error =
                |(bands, rows): (usize, usize)| ((1.0 / bands as f64).powf(1.0 / rows as f64) - threshold).abs();
            error(*a).total_cmp(&error(*b))
        })
        .unwrap_or((1, num_perm))
}

/// The text exact deduplication compares: lower-cased, whitespace collapsed.
fn exact_key(text: &str) -> [u8; 16] {
    let normalized: String = text.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase();
    Sha256::digest(normalized.as_bytes())[..16].try_into().expect("16 bytes")
}

/// Hashes of a document's shingles: word n-grams (lower-cased), or character n-grams for CJK
/// text. Units are hashed once and windows combine their hashes, so no shingle string is built.
pub fn shingles(text: &str, config: &DedupConfig) -> Vec<u64> {
    let letters = text.chars().filter(|c| c.is_alphanumeric()).count().max(1);
    let cjk = text.chars().filter(|&c| is_cjk(c)).count() * 10 > letters * 3;
    let units: Vec<u64> = if cjk {
        text.chars().filter(|c| !c.is_whitespace()).map(|c| mix(c as u64)).collect()
    } else {
        text.split_whitespace().map(|w| hash_str(&w.to_lowercase())).collect()
    };
    let n = if cjk { config.char_shingle } else { config.word_shingle }.max(1);
    let combine = |window: &[u64]| window.iter().fold(0u64, |h, &u| mix(h.rotate_left(5) ^ u));
    if units.len() <= n {
        return vec![combine(&units)];
    }
    units.windows(n).map(combine).collect()
}

/// The MinHash signature of a set of shingle hashes: for each of `num_perm` hash functions
/// `h ↦ a·h + b (mod 2⁶⁴)` with odd `a`, the minimum over the shingles.
pub fn signature(shingles: &[u64], num_perm: usize) -> Vec<u64> {
    (0..num_perm as u64)
        .map(|i| {
            let (a, b) = (mix(2 * i) | 1, mix(2 * i + 1));
            shingles.iter().map(|&h| a.wrapping_mul(h).wrapping_add(b)).min().unwrap_or(u64::MAX)
        })
        .collect()
}

/// The share of equal positions of two signatures: an estimate of the Jaccard similarity.
pub fn estimated_jaccard(a: &[u64], b: &[u64]) -> f64 {
    a.iter().zip(b).filter(|(x, y)| x == y).count() as f64 / a.len().max(1) as f64
}

/// What a document is, relative to the ones seen before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Unique,
    ExactDuplicate,
    NearDuplicate,
}

/// Per-document precomputation that can run in parallel.
pub struct Fingerprint {
    exact: [u8; 16],
    bands: Vec<u64>,
}

/// The dedup index: exact keys and one LSH bucket set per band. Memory grows by 16 bytes plus 8 per
/// band for each kept document.
pub struct Deduplicator {
    config: DedupConfig,
    rows: usize,
    exact: FxHashSet<[u8; 16]>,
    buckets: Vec<FxHashSet<u64>>,
}

impl Deduplicator {
    pub fn new(config: DedupConfig) -> Self {
        let (bands, rows) = lsh_bands(config.threshold, config.num_perm);
        Self { config, rows, exact: FxHashSet::default(), buckets: vec![FxHashSet::default(); bands] }
    }

    /// Fingerprints a document (pure; call from any thread).
    pub fn fingerprint(&self, text: &str) -> Fingerprint {
        let bands = if self.config.near {
            let signature = signature(&shingles(text, &self.config), self.buckets.len() * self.rows);
            signature.chunks(self.rows).map(|band| band.iter().fold(0u64, |h, &v| mix(h ^ v))).collect()
        } else {
            vec![]
        };
        Fingerprint { exact: exact_key(text), bands }
    }

    /// Decides on a document and, when it is unique, remembers it.
    pub fn check(&mut self, fingerprint: &Fingerprint) -> Verdict {
        if self.config.exact && self.exact.contains(&fingerprint.exact) {
            return Verdict::ExactDuplicate;
        }
        if self.config.near && fingerprint.bands.iter().zip(&self.buckets).any(|(band, bucket)| bucket.contains(band)) {
            return Verdict::NearDuplicate;
        }
        self.exact.insert(fingerprint.exact);
        for (band, bucket) in fingerprint.bands.iter().zip(&mut self.buckets) {
            bucket.insert(*band);
        }
        Verdict::Unique
    }
}
