//! Documents to token ids, exactly as HF `tokenizers` encodes them, with a chunk cache in front.
//!
//! The byte-level BPE pre-tokenizers (GPT-2, SmolLM/StarCoder, Llama 3, Qwen 2), with no normalizer,
//! never let a pre-token cross a single space that sits between two non-space characters (no
//! alternative of their regexes matches a non-space followed by a space, and a space before a
//! non-space always starts a pre-token), nor cross from a letter into punctuation (no alternative
//! matches a letter followed by a non-letter, non-digit, non-space). Their regexes look only ahead,
//! so a document cut at those places gives chunks that encode independently: its ids are the
//! chunks' ids joined. Text repeats its chunks (words with their leading space, clauses of Chinese)
//! the way it repeats words, so a cache shared by the threads maps chunks to ids and only unseen
//! chunks reach the tokenizer. Any other tokenizer, and any tokenizer whose added tokens could span
//! or strip across a chunk boundary, takes HF's own path; a document that contains an added token
//! is cut at spaces only (`<|endoftext|>` has letters before its `|`).

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::RwLock;

use aho_corasick::AhoCorasick;
use anyhow::{anyhow, Result};
use rayon::prelude::*;
use rustc_hash::{FxBuildHasher, FxHashMap};
use serde_json::Value;
use tokenizers::Tokenizer;

/// The Llama 3 and Qwen 2 `Split` patterns (`train/src/gguf/tokenizer.rs` writes them; Meta's and
/// Qwen's own `tokenizer.json` carry the same strings): each was checked to split at every chunk boundary.
const SPLIT_PATTERNS: [&str; 2] = [
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
];
/// Chunks longer than this are encoded but not cached (a run of CJK text or a URL rarely repeats).
const MAX_CACHED_CHUNK_BYTES: usize = 128;
/// At most this many chunks are cached (about 100 MB); later unseen chunks are encoded each time.
const CACHE_CAPACITY: usize = 1 << 20;
const SHARD_BITS: u32 = 6;

/// A tokenizer for whole documents: never truncates or pads, adds the tokenizer's special tokens.
pub struct DocumentTokenizer {
    tokenizer: Tokenizer,
    chunked: Option<Chunked>,
}

/// What the post-processor adds around a document, the added tokens, and the chunk cache.
struct Chunked {
    prefix: Vec<u32>,
    suffix: Vec<u32>,
    /// The added tokens' texts: a document with one is not cut at punctuation (`<|endoftext|>`
    /// has letters before its `|`).
    added: AhoCorasick,
    cache: ChunkCache,
}

impl DocumentTokenizer {
    /// Wraps `tokenizer`, turning off its truncation and padding (a document is never cut) and
    /// choosing the chunked path where it is exact.
    pub fn new(tokenizer: Tokenizer) -> Result<Self> {
        let tokenizer = whole_documents(tokenizer)?;
        let chunked = if chunk_safe(&tokenizer)? { Chunked::probe(&tokenizer)? } else { None };
        Ok(Self { tokenizer, chunked })
    }

    /// The wrapped tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Whether documents are encoded chunk by chunk through the cache.
    pub fn is_chunked(&self) -> bool {
        self.chunked.is_some()
    }

    /// The ids of each of `texts` (special tokens added), in parallel.
    pub fn encode_batch(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        texts.par_iter().map(|text| self.encode(text)).collect()
    }

    /// The ids of one document, special tokens added: what `Tokenizer::encode(text, true)` gives.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let Some(chunked) = &self.chunked else {
            return self.encode_with_hf(text, true);
        };
        let mut ids = chunked.prefix.clone();
        for chunk in chunked.chunks(text) {
            if chunk.len() > MAX_CACHED_CHUNK_BYTES {
                ids.extend(self.encode_with_hf(chunk, false)?);
            } else if !chunked.cache.extend_from(chunk, &mut ids) {
                let chunk_ids = self.encode_with_hf(chunk, false)?;
                ids.extend_from_slice(&chunk_ids);
                chunked.cache.insert(chunk, chunk_ids);
            }
        }
        ids.extend_from_slice(&chunked.suffix);
        Ok(ids)
    }

    /// The pieces of `text` that are encoded independently: the chunks, or the whole text where
    /// chunking would not be exact.
    pub fn chunks<'t>(&self, text: &'t str) -> Box<dyn Iterator<Item = &'t str> + 't> {
        match &self.chunked {
            Some(chunked) => Box::new(chunked.chunks(text)),
            None => Box::new(std::iter::once(text)),
        }
    }

    fn encode_with_hf(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self.tokenizer.encode_fast(text, add_special_tokens).map_err(|e| anyhow!("{e}"))?;
        Ok(encoding.get_ids().to_vec())
    }
}

/// `tokenizer` with its truncation and padding (meant for batches of short inputs) turned off.
pub fn whole_documents(mut tokenizer: Tokenizer) -> Result<Tokenizer> {
    tokenizer.with_truncation(None).map_err(|e| anyhow!("turning truncation off: {e}"))?;
    tokenizer.with_padding(None);
    Ok(tokenizer)
}

impl Chunked {
    /// `text`'s chunks: cut at punctuation too unless it contains an added token.
    fn chunks<'t>(&self, text: &'t str) -> impl Iterator<Item = &'t str> {
        chunks(text, !self.added.is_match(text))
    }

    /// The ids the post-processor puts before and after a document, if it only adds fixed ones
    /// (none, BOS/EOS templates); `None` for anything else.
    fn probe(tokenizer: &Tokenizer) -> Result<Option<Self>> {
        let mut around = None;
        for probe in ["a", "Hello, world 12"] {
            let encode = |special| tokenizer.encode_fast(probe, special).map_err(|e| anyhow!("{e}"));
            let (with, without) = (encode(true)?.get_ids().to_vec(), encode(false)?.get_ids().to_vec());
            let Some(start) = (0..=with.len().saturating_sub(without.len()))
                .find(|&s| with.get(s..s + without.len()) == Some(without.as_slice()))
            else {
                return Ok(None);
            };
            let this = (with[..start].to_vec(), with[start + without.len()..].to_vec());
            if around.as_ref().is_some_and(|first| *first != this) {
                return Ok(None);
            }
            around = Some(this);
        }
        let (prefix, suffix) = around.expect("two probes");
        let added = AhoCorasick::new(tokenizer.get_added_tokens_decoder().into_values().map(|t| t.content))?;
        Ok(Some(Self { prefix, suffix, added, cache: ChunkCache::default() }))
    }
}

/// Whether `tokenizer` encodes chunks independently (see the module documentation).
fn chunk_safe(tokenizer: &Tokenizer) -> Result<bool> {
    if tokenizer.get_normalizer().is_some() {
        return Ok(false);
    }
    let added_tokens_stay_inside_chunks = tokenizer
        .get_added_tokens_decoder()
        .values()
        .all(|t| !t.lstrip && !t.rstrip && !t.single_word && !t.content.chars().any(char::is_whitespace));
    let Some(pre) = tokenizer.get_pre_tokenizer() else { return Ok(false) };
    let steps = match serde_json::to_value(pre)? {
        Value::Object(step) if step["type"] == "Sequence" => {
            step["pretokenizers"].as_array().cloned().unwrap_or_default()
        }
        step => vec![step],
    };
    let boundary_splitter = |s: &Value| match s["type"].as_str() {
        Some("ByteLevel") => s["use_regex"] == true,
        Some("Split") => {
            SPLIT_PATTERNS.iter().any(|p| s["pattern"]["Regex"] == *p)
                && s["behavior"] == "Isolated"
                && s["invert"] == false
        }
        _ => false,
    };
    let keeps_boundaries = |s: &Value| match s["type"].as_str() {
        Some("ByteLevel") => s["add_prefix_space"] == false,
        Some("Digits") => true,
        _ => boundary_splitter(s),
    };
    Ok(added_tokens_stay_inside_chunks && steps.iter().any(boundary_splitter) && steps.iter().all(keeps_boundaries))
}

/// `text` cut before every space that sits between two non-space characters and, with
/// `at_punctuation`, before every punctuation mark that follows a letter.
fn chunks(text: &str, at_punctuation: bool) -> impl Iterator<Item = &str> {
    let bytes = text.as_bytes();
    let mut start = 0;
    let mut cuts = (1..bytes.len()).filter(move |&i| {
        if bytes[i] == b' ' {
            i + 1 < bytes.len() && !char_before(text, i).is_whitespace() && !char_after(text, i + 1).is_whitespace()
        } else {
            at_punctuation
                && text.is_char_boundary(i)
                && is_punctuation(char_after(text, i))
                && is_letter(char_before(text, i))
        }
    });
    std::iter::from_fn(move || {
        if start >= text.len() {
            return None;
        }
        let end = cuts.find(|&i| i > start).unwrap_or(text.len());
        let chunk = &text[start..end];
        start = end;
        Some(chunk)
    })
}

/// Letters (`\p{L}`) in every Unicode version a regex engine may use: ASCII and the CJK ideographs
/// of Unicode 1.1. Other letters simply never start a cut.
fn is_letter(c: char) -> bool {
    c.is_ascii_alphabetic() || ('\u{4E00}'..='\u{9FA5}').contains(&c)
}

/// Punctuation (`\p{P}` or `\p{S}`: no letter, digit or space) that prose puts after words.
fn is_punctuation(c: char) -> bool {
    c.is_ascii_punctuation() || "，。、；：？！「」『』（）《》〈〉【】…—·“”‘’".contains(c)
}

fn char_before(text: &str, i: usize) -> char {
    match text.as_bytes()[i - 1] {
        b if b.is_ascii() => b as char,
        _ => text[..i].chars().next_back().expect("a character before a space"),
    }
}

fn char_after(text: &str, i: usize) -> char {
    match text.as_bytes()[i] {
        b if b.is_ascii() => b as char,
        _ => text[i..].chars().next().expect("a character after a space"),
    }
}

/// Chunk → ids, sharded so that the threads rarely wait on each other; stops growing at capacity.
struct ChunkCache {
    shards: Vec<RwLock<FxHashMap<Box<str>, Box<[u32]>>>>,
    entries: AtomicUsize,
}

impl Default for ChunkCache {
    fn default() -> Self {
        Self { shards: (0..1 << SHARD_BITS).map(|_| RwLock::default()).collect(), entries: AtomicUsize::new(0) }
    }
}

impl ChunkCache {
    fn shard(&self, chunk: &str) -> &RwLock<FxHashMap<Box<str>, Box<[u32]>>> {
        &self.shards[(FxBuildHasher.hash_one(chunk) >> (64 - SHARD_BITS)) as usize]
    }

    /// Appends `chunk`'s ids to `ids` if the chunk is cached.
    fn extend_from(&self, chunk: &str, ids: &mut Vec<u32>) -> bool {
        let shard = self.shard(chunk).read().unwrap_or_else(|e| e.into_inner());
        shard.get(chunk).map(|cached| ids.extend_from_slice(cached)).is_some()
    }

    fn insert(&self, chunk: &str, ids: Vec<u32>) {
        if self.entries.load(Ordering::Relaxed) >= CACHE_CAPACITY {
            return;
        }
        let mut shard = self.shard(chunk).write().unwrap_or_else(|e| e.into_inner());
        if shard.insert(chunk.into(), ids.into()).is_none() {
            self.entries.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::chunks;

    #[test]
    fn chunks_cut_only_before_single_spaces_between_non_spaces() {
        fn cut(text: &str) -> Vec<&str> {
            chunks(text, false).collect()
        }
        assert_eq!(cut("The cat, sat."), ["The", " cat,", " sat."]);
        assert_eq!(cut(" lead  two\n next\u{a0} x 中 文"), [" lead  two\n next\u{a0} x", " 中", " 文"]);
        assert_eq!(cut("a b"), ["a", " b"]);
        assert_eq!(cut("a "), ["a "]);
        assert!(cut("").is_empty());
        let text = "Zipf's law: 12 345 words\tand  spaces \u{3000}end";
        assert_eq!(cut(text).concat(), text);
    }

    #[test]
    fn chunks_cut_before_punctuation_after_a_letter_when_asked() {
        fn cut(text: &str) -> Vec<&str> {
            chunks(text, true).collect()
        }
        assert_eq!(cut("床前明月光，疑是地上霜。"), ["床前明月光", "，疑是地上霜", "。"]);
        assert_eq!(cut("Hello, world... it's"), ["Hello", ",", " world", "...", " it", "'s"]);
        assert_eq!(cut("1, (a)"), ["1,", " (a", ")"]);
    }
}
