//! What preparation did to the text: per rule, how many documents (or lines) and characters it
//! removed, with a few examples so users can tune the rules.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::{Deserialize, Serialize};

/// Examples kept per rule.
const EXAMPLES: usize = 3;
/// Characters kept per example.
const EXAMPLE_CHARS: usize = 200;
/// Bad records listed individually (all are counted).
const BAD_RECORDS_LISTED: usize = 100;

/// Removals by one rule.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RuleStats {
    /// Documents dropped (document rules) or lines removed (line rules).
    pub removed: u64,
    pub chars: u64,
    /// Where the first examples came from and how they began.
    pub examples: Vec<Example>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Example {
    pub origin: String,
    pub text: String,
}

/// The preparation report, stored in the manifest's `stats` and printed as a table.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub files: u64,
    pub bytes_read: u64,
    pub documents_read: u64,
    pub documents_kept: u64,
    pub chars_read: u64,
    pub chars_kept: u64,
    /// Line rules (`boilerplate_line`, `url_line`, `symbol_line`): `removed` counts lines.
    pub line_rules: BTreeMap<String, RuleStats>,
    /// Document rules and deduplication (`exact_duplicate`, `near_duplicate`): `removed` counts documents.
    pub document_rules: BTreeMap<String, RuleStats>,
    pub bad_records: u64,
    /// The first bad records as `file:line: reason`.
    pub bad_record_examples: Vec<String>,
}

fn record(stats: &mut RuleStats, origin: &str, text: &str) {
    stats.removed += 1;
    stats.chars += text.chars().count() as u64;
    if stats.examples.len() < EXAMPLES {
        stats.examples.push(Example { origin: origin.to_string(), text: text.chars().take(EXAMPLE_CHARS).collect() });
    }
}

impl Report {
    pub fn line_removed(&mut self, rule: &str, origin: &str, line: &str) {
        record(self.line_rules.entry(rule.to_string()).or_default(), origin, line);
    }

    pub fn document_removed(&mut self, rule: &str, origin: &str, text: &str) {
        record(self.document_rules.entry(rule.to_string()).or_default(), origin, text);
    }

    pub fn bad_record(&mut self, origin: &str, reason: &str) {
        self.bad_records += 1;
        if self.bad_record_examples.len() < BAD_RECORDS_LISTED {
            self.bad_record_examples.push(format!("{origin}: {reason}"));
        }
    }

    /// A readable summary: one row per rule, then the examples.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let pct = |part: u64, whole: u64| 100.0 * part as f64 / whole.max(1) as f64;
        let _ = writeln!(
            out,
            "read {} documents ({} chars, {} files); kept {} ({:.1}%) with {} chars ({:.1}%); {} bad records",
            self.documents_read,
            self.chars_read,
            self.files,
            self.documents_kept,
            pct(self.documents_kept, self.documents_read),
            self.chars_kept,
            pct(self.chars_kept, self.chars_read),
            self.bad_records
        );
        let _ = writeln!(out, "{:<20} {:>10} {:>12} {:>8}", "rule", "removed", "chars", "% chars");
        for (kind, rules) in [("lines", &self.line_rules), ("docs", &self.document_rules)] {
            for (rule, stats) in rules {
                let _ = writeln!(
                    out,
                    "{:<20} {:>6} {kind:<3} {:>12} {:>7.2}%",
                    rule,
                    stats.removed,
                    stats.chars,
                    pct(stats.chars, self.chars_read)
                );
            }
        }
        for (rule, stats) in self.line_rules.iter().chain(&self.document_rules) {
            for example in &stats.examples {
                let text = example.text.replace('\n', " ⏎ ");
                let _ = writeln!(out, "  {rule} @ {}: {text}", example.origin);
            }
        }
        for bad in &self.bad_record_examples {
            let _ = writeln!(out, "  bad record {bad}");
        }
        out
    }
}
