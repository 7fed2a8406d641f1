//! How text becomes a dataset: the request of `POST /v1/datasets` and the preparation config it
//! and `cpt-worker prepare --config` take. Only the settings live here (the server validates them without linking
//! the text pipeline); `cpt-data` does the work.

use serde::{Deserialize, Serialize};

use crate::spec::{limits, FieldError};

/// Bounds of a preparation config: generous for real corpora, far from what would exhaust a worker.
pub mod bounds {
    /// Documents cleaned and tokenized together.
    pub const BATCH_DOCUMENTS: usize = 1 << 16;
    /// MinHash permutations (a signature of this many u64s is kept per document).
    pub const NUM_PERM: usize = 1024;
    pub const SHINGLE: usize = 64;
    pub const PATTERNS: usize = 1024;
    pub const PATTERN_BYTES: usize = 1024;
    pub const LINE_CHARS: usize = 1 << 20;
    pub const DOCUMENT_CHARS: usize = 1 << 30;
    pub const LANGUAGES: usize = 256;
    pub const FIELD_BYTES: usize = 256;
}

/// Unicode normalisation form. NFKC folds full-width CJK punctuation (，→ ,), so NFC is the default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Normalization {
    None,
    Nfc,
    Nfkc,
}

/// Every cleaning rule's setting; `Default` gives sensible values for English and Chinese.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CleanConfig {
    pub normalization: Normalization,
    /// Remove control characters other than newline and tab.
    pub strip_control_chars: bool,
    /// Lines at most `boilerplate_max_line_chars` long containing one of these (ASCII case-insensitive) go.
    pub boilerplate_patterns: Vec<String>,
    pub boilerplate_max_line_chars: usize,
    /// Lines whose characters are mostly URLs go.
    pub max_url_line_ratio: f64,
    /// Lines of at least 4 visible characters that are mostly symbols (not letters, digits or spaces) go.
    pub max_symbol_line_ratio: f64,
    pub min_chars: usize,
    pub max_chars: usize,
    /// Non-CJK documents: mean word length bounds (Gopher: 3–10), over the words without CJK
    /// characters.
    pub min_mean_word_length: f64,
    pub max_mean_word_length: f64,
    /// `#` and `…` per word (Gopher: 0.1).
    pub max_symbol_word_ratio: f64,
    /// Fraction of lines starting with a bullet (Gopher: 0.9).
    pub max_bullet_line_ratio: f64,
    /// Fraction of lines ending with an ellipsis (Gopher: 0.3).
    pub max_ellipsis_line_ratio: f64,
    /// Fraction of characters in lines that repeat an earlier line (Gopher: 0.2).
    pub max_duplicate_line_char_fraction: f64,
    /// For n = 2, 3, 4: the most frequent n-gram's share of characters (Gopher: 0.2, 0.18, 0.16).
    /// Words for most text, characters for CJK; only for documents of at least 64 such units, where
    /// repetition means spam rather than style (refrains in poems).
    pub max_top_ngram_char_fraction: [f64; 3],
    /// Keep only documents detected as one of these ISO 639-3 codes (e.g. `eng`, `cmn`); empty keeps all.
    pub languages: Vec<String>,
}

impl Default for CleanConfig {
    fn default() -> Self {
        let patterns = [
            "subscribe to our newsletter",
            "accept all cookies",
            "we use cookies",
            "cookie policy",
            "click here to",
            "all rights reserved",
            "sign up for our",
            "follow us on",
            "share this article",
            "privacy policy",
            "terms of service",
            "enable javascript",
            "点击关注",
            "扫码",
            "扫一扫",
            "广告",
            "版权所有",
            "关注公众号",
            "长按识别",
            "免责声明",
            "转载请注明",
            "未经授权",
            "点击阅读原文",
        ];
        Self {
            normalization: Normalization::Nfc,
            strip_control_chars: true,
            boilerplate_patterns: patterns.iter().map(|p| p.to_string()).collect(),
            boilerplate_max_line_chars: 80,
            max_url_line_ratio: 0.5,
            max_symbol_line_ratio: 0.5,
            min_chars: 16,
            max_chars: 1_000_000,
            min_mean_word_length: 3.0,
            max_mean_word_length: 10.0,
            max_symbol_word_ratio: 0.1,
            max_bullet_line_ratio: 0.9,
            max_ellipsis_line_ratio: 0.3,
            max_duplicate_line_char_fraction: 0.2,
            max_top_ngram_char_fraction: [0.2, 0.18, 0.16],
            languages: vec![],
        }
    }
}

/// Deduplication settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DedupConfig {
    pub exact: bool,
    pub near: bool,
    /// Estimated Jaccard similarity above which two documents are near-duplicates.
    pub threshold: f64,
    /// MinHash permutations (signature length).
    pub num_perm: usize,
    /// Shingle size in words, for text that is not mostly CJK.
    pub word_shingle: usize,
    /// Shingle size in characters, for CJK text.
    pub char_shingle: usize,
}

impl Default for DedupConfig {
    fn default() -> Self {
        Self { exact: true, near: true, threshold: 0.8, num_perm: 112, word_shingle: 5, char_shingle: 3 }
    }
}

/// What happens to the tokens after the last full block of a split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TailPolicy {
    #[default]
    Drop,
    Pad,
}

/// How text becomes a dataset; every part has a default (`{}` is a valid config file).
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
    /// The end-of-document token joining documents; by default the tokenizer's own
    /// (`<|endoftext|>`, `</s>`, `<|end_of_text|>` or `<eos>`).
    pub eos_token: Option<String>,
    pub clean: CleanConfig,
    pub dedup: DedupConfig,
    /// Documents processed together (cleaned and tokenized in parallel).
    pub batch_documents: usize,
    /// The incomplete last block of each split: `drop` it, or `pad` it with EOS (masked in training;
    /// useful when a validation split is smaller than a block).
    pub tail: TailPolicy,
}

impl Default for PrepareConfig {
    fn default() -> Self {
        Self {
            seq_len: 2048,
            validation_fraction: 0.005,
            txt_split_on_blank_lines: true,
            jsonl_text_field: "text".into(),
            eos_token: None,
            clean: CleanConfig::default(),
            dedup: DedupConfig::default(),
            batch_documents: 1024,
            tail: TailPolicy::Drop,
        }
    }
}

impl PrepareConfig {
    /// Checks every setting's range; errors name the field (`dedup.num_perm`). A config outside
    /// these bounds once made every worker that leased it abort or run out of memory.
    pub fn validate(&self) -> Result<(), FieldError> {
        let problem = |field: &str, message: String| FieldError { field: field.into(), message };
        let within = |value: usize, low: usize, high: usize, field: &str| {
            if (low..=high).contains(&value) {
                Ok(())
            } else {
                Err(problem(field, format!("must be between {low} and {high}")))
            }
        };
        let fraction = |value: f64, field: &str| {
            if (0.0..=1.0).contains(&value) {
                Ok(())
            } else {
                Err(problem(field, "must be between 0 and 1".into()))
            }
        };
        within(self.seq_len, 1, limits::SEQ_LEN as usize, "seq_len")?;
        within(self.batch_documents, 1, bounds::BATCH_DOCUMENTS, "batch_documents")?;
        fraction(self.validation_fraction, "validation_fraction")?;
        within(self.jsonl_text_field.len(), 1, bounds::FIELD_BYTES, "jsonl_text_field")?;
        within(self.eos_token.as_ref().map_or(1, String::len), 1, bounds::FIELD_BYTES, "eos_token")?;
        let dedup = &self.dedup;
        within(dedup.num_perm, 1, bounds::NUM_PERM, "dedup.num_perm")?;
        within(dedup.word_shingle, 1, bounds::SHINGLE, "dedup.word_shingle")?;
        within(dedup.char_shingle, 1, bounds::SHINGLE, "dedup.char_shingle")?;
        fraction(dedup.threshold, "dedup.threshold")?;
        let clean = &self.clean;
        within(clean.boilerplate_patterns.len(), 0, bounds::PATTERNS, "clean.boilerplate_patterns")?;
        for (i, pattern) in clean.boilerplate_patterns.iter().enumerate() {
            within(pattern.len(), 1, bounds::PATTERN_BYTES, &format!("clean.boilerplate_patterns[{i}]"))?;
        }
        within(clean.boilerplate_max_line_chars, 0, bounds::LINE_CHARS, "clean.boilerplate_max_line_chars")?;
        within(clean.max_chars, 1, bounds::DOCUMENT_CHARS, "clean.max_chars")?;
        within(clean.min_chars, 0, clean.max_chars, "clean.min_chars")?;
        within(clean.languages.len(), 0, bounds::LANGUAGES, "clean.languages")?;
        for (i, language) in clean.languages.iter().enumerate() {
            within(language.len(), 1, 8, &format!("clean.languages[{i}]"))?;
        }
        let ratios = [
            (clean.max_url_line_ratio, "clean.max_url_line_ratio"),
            (clean.max_symbol_line_ratio, "clean.max_symbol_line_ratio"),
            (clean.max_symbol_word_ratio, "clean.max_symbol_word_ratio"),
            (clean.max_bullet_line_ratio, "clean.max_bullet_line_ratio"),
            (clean.max_ellipsis_line_ratio, "clean.max_ellipsis_line_ratio"),
            (clean.max_duplicate_line_char_fraction, "clean.max_duplicate_line_char_fraction"),
        ];
        for (value, field) in ratios {
            fraction(value, field)?;
        }
        for (i, value) in clean.max_top_ngram_char_fraction.iter().enumerate() {
            fraction(*value, &format!("clean.max_top_ngram_char_fraction[{i}]"))?;
        }
        let words = clean.min_mean_word_length..=clean.max_mean_word_length;
        if !(words.start().is_finite() && words.end().is_finite() && *words.start() >= 0.0 && !words.is_empty()) {
            return Err(problem(
                "clean.min_mean_word_length",
                "must be finite, at least 0 and at most max_mean_word_length".into(),
            ));
        }
        Ok(())
    }
}

/// What a job's submission checks of a dataset's `manifest.json` (the whole format is `cpt-data`'s).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ManifestSummary {
    pub seq_len: usize,
    pub vocab_size: usize,
    pub splits: std::collections::BTreeMap<String, SplitSummary>,
}

/// The counts of one split.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct SplitSummary {
    pub documents: u64,
    pub blocks: u64,
}

impl ManifestSummary {
    /// The counts of split `name` (`train` or `validation`), zero when it is absent.
    pub fn split(&self, name: &str) -> SplitSummary {
        self.splits.get(name).cloned().unwrap_or_default()
    }
}

/// A dataset preparation, as submitted to `POST /v1/datasets`: clean, deduplicate, tokenize and
/// pack `inputs` with `tokenizer` into `<data-dir>/datasets/<job-id>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrepareSpec {
    pub name: String,
    /// A `tokenizer.json` (normally the base model's).
    pub tokenizer: String,
    /// Files, directories or glob patterns of `.txt`, `.jsonl` and their `.gz`.
    pub inputs: Vec<String>,
    /// The preparation config (`cpt-worker prepare --config`): `seq_len`, `validation_fraction`,
    /// `clean`, `dedup`, …; absent fields take their defaults.
    #[serde(default)]
    pub config: serde_json::Value,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(change: serde_json::Value) -> String {
        let config: PrepareConfig = serde_json::from_value(change).unwrap();
        config.validate().unwrap_err().field
    }

    #[test]
    fn the_default_config_is_valid_and_each_setting_is_bounded_by_field() {
        PrepareConfig::default().validate().unwrap();
        assert_eq!(refused(serde_json::json!({"batch_documents": 1_000_000_000_000_000u64})), "batch_documents");
        assert_eq!(refused(serde_json::json!({"batch_documents": u64::MAX})), "batch_documents");
        assert_eq!(refused(serde_json::json!({"batch_documents": 0})), "batch_documents");
        assert_eq!(refused(serde_json::json!({"seq_len": 1u64 << 40, "tail": "pad"})), "seq_len");
        assert_eq!(refused(serde_json::json!({"dedup": {"num_perm": 100_000_000_000_000u64}})), "dedup.num_perm");
        assert_eq!(refused(serde_json::json!({"dedup": {"threshold": 2.0}})), "dedup.threshold");
        assert_eq!(refused(serde_json::json!({"validation_fraction": -0.1})), "validation_fraction");
        assert_eq!(refused(serde_json::json!({"clean": {"min_chars": 10, "max_chars": 5}})), "clean.min_chars");
        assert_eq!(
            refused(serde_json::json!({"clean": {"boilerplate_patterns": [""]}})),
            "clean.boilerplate_patterns[0]"
        );
        assert_eq!(refused(serde_json::json!({"clean": {"max_mean_word_length": 1.0}})), "clean.min_mean_word_length");
    }
}
