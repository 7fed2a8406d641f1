//! A vocabulary extension, as submitted to `POST /v1/vocabularies` (and run by
//! `cpt-worker extend-vocab`): a BPE trained on a domain corpus, appended to a base model's
//! tokenizer, and a new model directory whose added rows start at their pieces' mean.

use serde::{Deserialize, Serialize};

use crate::spec::FieldError;

/// At most this many tokens added at once (Chinese LLaMA added ~20k; 2^20 is far past any use).
pub const MAX_NEW_TOKENS: usize = 1 << 20;
/// At most this many corpus inputs (each may be a directory or a pattern) and report texts.
pub const MAX_INPUTS: usize = 1000;
pub const MAX_REPORT_TEXTS: usize = 64;

/// What to extend and with what.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VocabularySpec {
    pub name: String,
    /// The base model directory; its tokenizer must be a byte-level BPE (GPT-2, Llama 3, SmolLM, Qwen).
    pub base_model: String,
    /// Domain text the new tokens are learned from: files, directories or glob patterns of `.txt`,
    /// `.jsonl` and their `.gz`.
    pub corpus: Vec<String>,
    /// Tokens to add (at most; fewer when the corpus has fewer frequent merges).
    pub new_tokens: usize,
    /// A merge must occur this often in the corpus.
    #[serde(default = "two")]
    pub min_frequency: u64,
    /// Text files whose fertility (tokens per 1000 characters) is reported before and after.
    #[serde(default)]
    pub report_texts: Vec<String>,
}

fn two() -> u64 {
    2
}

impl VocabularySpec {
    /// Checks every field's range; the first problem wins.
    pub fn validate(&self) -> Result<(), FieldError> {
        let problem = |field: &str, message: String| Err(FieldError { field: field.into(), message });
        crate::spec::check_name("name", &self.name)?;
        if self.corpus.is_empty() || self.corpus.len() > MAX_INPUTS {
            return problem("corpus", format!("needs 1 to {MAX_INPUTS} paths"));
        }
        if self.new_tokens == 0 || self.new_tokens > MAX_NEW_TOKENS {
            return problem("new_tokens", format!("must be 1 to {MAX_NEW_TOKENS}"));
        }
        if self.min_frequency == 0 {
            return problem("min_frequency", "must be positive".into());
        }
        if self.report_texts.len() > MAX_REPORT_TEXTS {
            return problem("report_texts", format!("at most {MAX_REPORT_TEXTS} files"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VocabularySpec {
        serde_json::from_str(r#"{"name": "zh", "base_model": "m", "corpus": ["c.txt"], "new_tokens": 100}"#).unwrap()
    }

    #[test]
    fn defaults_apply_and_each_bad_field_is_named() {
        let good = spec();
        assert_eq!((good.min_frequency, good.report_texts.len()), (2, 0));
        assert_eq!(good.validate(), Ok(()));
        let cases: [(&str, fn(&mut VocabularySpec)); 5] = [
            ("name", |s| s.name = " ".into()),
            ("corpus", |s| s.corpus.clear()),
            ("new_tokens", |s| s.new_tokens = 0),
            ("min_frequency", |s| s.min_frequency = 0),
            ("report_texts", |s| s.report_texts = vec!["t".into(); MAX_REPORT_TEXTS + 1]),
        ];
        for (field, spoil) in cases {
            let mut bad = spec();
            spoil(&mut bad);
            assert_eq!(bad.validate().unwrap_err().field, field);
        }
    }
}
