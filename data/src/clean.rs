//! Cleaning: Unicode normalisation, line-level removal of boilerplate and junk lines, and
//! document-level quality rules in the spirit of Gopher (Rae et al. 2021) and RefinedWeb (Penedo et
//! al. 2023), with CJK-aware variants. Every rule has a stable name used in the report.

use aho_corasick::AhoCorasick;
use rustc_hash::{FxHashMap, FxHashSet};
use unicode_normalization::{is_nfc_quick, is_nfkc_quick, IsNormalized, UnicodeNormalization};

use crate::hash::{hash_str, mix};

pub use cpt_protocol::prepare::{CleanConfig, Normalization};

/// A line removed from a kept or dropped document, and the rule that removed it.
pub type RemovedLine = (&'static str, String);

/// The result of cleaning one document.
#[derive(Debug, Clone, PartialEq)]
pub struct Cleaned {
    /// The cleaned text, or the rule that dropped the whole document.
    pub outcome: Result<String, &'static str>,
    pub removed_lines: Vec<RemovedLine>,
}

/// Whether `c` is a CJK ideograph, kana or hangul syllable.
pub fn is_cjk(c: char) -> bool {
    matches!(c as u32, 0x3040..=0x30FF | 0x3400..=0x4DBF | 0x4E00..=0x9FFF | 0xAC00..=0xD7AF | 0xF900..=0xFAFF | 0x20000..=0x2FA1F)
}

fn url_chars(line: &str) -> usize {
    line.split_whitespace()
        .filter(|w| w.starts_with("http://") || w.starts_with("https://") || w.starts_with("www."))
        .map(|w| w.chars().count())
        .sum()
}

fn line_rule(line: &str, boilerplate: &AhoCorasick, config: &CleanConfig) -> Option<&'static str> {
    let chars = line.chars().count();
    if chars <= config.boilerplate_max_line_chars && boilerplate.is_match(line) {
        return Some("boilerplate_line");
    }
    let visible = line.chars().filter(|c| !c.is_whitespace()).count();
    if visible > 0 && url_chars(line) as f64 / visible as f64 > config.max_url_line_ratio {
        return Some("url_line");
    }
    let symbols = line.chars().filter(|c| !c.is_alphanumeric() && !c.is_whitespace()).count();
    if visible >= 4 && symbols as f64 / visible as f64 > config.max_symbol_line_ratio {
        return Some("symbol_line");
    }
    None
}

/// Documents shorter than this (in words, or characters for CJK) skip the n-gram rule.
const MIN_NGRAM_UNITS: usize = 64;

/// The share of characters covered by the most frequent n-gram, for n = 2, 3, 4, over units given
/// as `(hash, characters)`.
fn top_ngram_fractions(units: &[(u64, usize)]) -> [f64; 3] {
    let total: usize = units.iter().map(|u| u.1).sum();
    let mut fractions = [0.0; 3];
    if units.len() < MIN_NGRAM_UNITS || total == 0 {
        return fractions;
    }
    for (slot, n) in (2..=4).enumerate() {
        let mut counts: FxHashMap<u64, (usize, usize)> = FxHashMap::default();
        for gram in units.windows(n) {
            let key = gram.iter().fold(0u64, |h, u| mix(h.rotate_left(7) ^ u.0));
            let entry = counts.entry(key).or_insert((0, gram.iter().map(|u| u.1).sum()));
            entry.0 += 1;
        }
        if let Some((count, chars)) = counts.into_values().filter(|(c, _)| *c > 1).max() {
            fractions[slot] = (chars * count) as f64 / total as f64;
        }
    }
    fractions
}

fn document_rule(text: &str, config: &CleanConfig) -> Option<&'static str> {
    let chars = text.chars().count();
    if chars < config.min_chars {
        return Some("too_short");
    }
    if chars > config.max_chars {
        return Some("too_long");
    }
    let letters = text.chars().filter(|c| c.is_alphanumeric()).count().max(1);
    let cjk = text.chars().filter(|&c| is_cjk(c)).count() as f64 / letters as f64 > 0.3;
    let words: Vec<&str> = text.split_whitespace().collect();
    // Word length means something only where the words are separated by spaces: a run of Chinese
    // between two spaces is a clause, and the commands and paths in Chinese documentation are not
    // prose (both removed valid Chinese technical documents). Applied when spaced words outnumber
    // CJK characters, over those words only.
    let spaced: Vec<&str> = words.iter().copied().filter(|w| !w.chars().any(is_cjk)).collect();
    let cjk_chars = text.chars().filter(|&c| is_cjk(c)).count();
    if !cjk && spaced.len() > cjk_chars {
        let mean = spaced.iter().map(|w| w.chars().count()).sum::<usize>() as f64 / spaced.len() as f64;
        if mean < config.min_mean_word_length || mean > config.max_mean_word_length {
            return Some("mean_word_length");
        }
    }
    let symbols = text.matches('#').count() + text.matches('…').count() + text.matches("...").count();
    let word_count = if cjk { text.chars().filter(|&c| is_cjk(c)).count() } else { words.len() };
    if symbols as f64 / word_count.max(1) as f64 > config.max_symbol_word_ratio {
        return Some("symbol_ratio");
    }
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let line_count = lines.len().max(1) as f64;
    let bullets = lines.iter().filter(|l| l.starts_with(['•', '-', '*', '·', '●', '▪', '◦', '‣'])).count();
    if lines.len() > 1 && bullets as f64 / line_count > config.max_bullet_line_ratio {
        return Some("bullet_lines");
    }
    let ellipses = lines.iter().filter(|l| l.ends_with("...") || l.ends_with('…')).count();
    if ellipses as f64 / line_count > config.max_ellipsis_line_ratio {
        return Some("ellipsis_lines");
    }
    let mut seen = FxHashSet::default();
    let duplicate_chars: usize = lines.iter().filter(|l| !seen.insert(**l)).map(|l| l.chars().count()).sum();
    let line_chars: usize = lines.iter().map(|l| l.chars().count()).sum();
    if duplicate_chars as f64 / line_chars.max(1) as f64 > config.max_duplicate_line_char_fraction {
        return Some("duplicate_lines");
    }
    let units: Vec<(u64, usize)> = if cjk {
        text.chars().filter(|c| c.is_alphanumeric()).map(|c| (mix(c as u64), 1)).collect()
    } else {
        words.iter().map(|w| (hash_str(w), w.chars().count())).collect()
    };
    let fractions = top_ngram_fractions(&units);
    if fractions.iter().zip(config.max_top_ngram_char_fraction).any(|(f, max)| *f > max) {
        return Some("repeated_ngrams");
    }
    if !config.languages.is_empty() {
        let detected = whatlang::detect(text).map(|info| info.lang().code());
        if !detected.is_some_and(|code| config.languages.iter().any(|l| l == code)) {
            return Some("language");
        }
    }
    None
}

/// A [`CleanConfig`] compiled for use: the boilerplate patterns become one automaton.
pub struct Cleaner {
    config: CleanConfig,
    boilerplate: AhoCorasick,
}

impl Cleaner {
    pub fn new(config: CleanConfig) -> anyhow::Result<Self> {
        let boilerplate = AhoCorasick::builder().ascii_case_insensitive(true).build(&config.boilerplate_patterns)?;
        Ok(Self { config, boilerplate })
    }

    /// Cleans one document.
    pub fn clean(&self, text: &str) -> Cleaned {
        let config = &self.config;
        // The quick checks answer "already normalised" for almost all text, which is then not rebuilt.
        let normalized: String = match config.normalization {
            Normalization::Nfc if is_nfc_quick(text.chars()) != IsNormalized::Yes => text.nfc().collect(),
            Normalization::Nfkc if is_nfkc_quick(text.chars()) != IsNormalized::Yes => text.nfkc().collect(),
            _ => text.to_string(),
        };
        let stripped = |c: char| c.is_control() && c != '\n' && c != '\t';
        let normalized: String = if config.strip_control_chars && normalized.contains(stripped) {
            normalized.chars().filter(|&c| !stripped(c)).collect()
        } else {
            normalized
        };
        let mut removed_lines = Vec::new();
        let mut kept = Vec::new();
        for line in normalized.lines() {
            match line_rule(line, &self.boilerplate, config) {
                Some(rule) => removed_lines.push((rule, line.to_string())),
                None => kept.push(line.trim_end()),
            }
        }
        let text = kept.join("\n").trim().to_string();
        let outcome = match document_rule(&text, config) {
            Some(rule) => Err(rule),
            None => Ok(text),
        };
        Cleaned { outcome, removed_lines }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cleaned(text: &str, normalization: Normalization) -> String {
        // Document rules off: only normalisation and control stripping act.
        let config = CleanConfig {
            normalization,
            min_chars: 0,
            min_mean_word_length: 0.0,
            max_symbol_line_ratio: 1.0,
            max_duplicate_line_char_fraction: 1.0,
            ..CleanConfig::default()
        };
        Cleaner::new(config).unwrap().clean(text).outcome.unwrap()
    }

    #[test]
    fn normalisation_and_control_stripping_rebuild_only_the_text_that_needs_it() {
        // Decomposed é (e + combining acute) composes; ﬁ (a compatibility ligature) splits under NFKC only.
        assert_eq!(cleaned("cafe\u{301} ﬁle", Normalization::Nfc), "caf\u{e9} ﬁle");
        assert_eq!(cleaned("cafe\u{301} ﬁle", Normalization::Nfkc), "caf\u{e9} file");
        assert_eq!(cleaned("cafe\u{301}", Normalization::None), "cafe\u{301}");
        // Control characters go, newlines and tabs stay; already-clean text comes back unchanged.
        assert_eq!(cleaned("a\u{7}b\u{0}c\td\ne", Normalization::Nfc), "abc\td\ne");
        assert_eq!(cleaned("plain\ttext\n中文", Normalization::Nfc), "plain\ttext\n中文");
    }
}
