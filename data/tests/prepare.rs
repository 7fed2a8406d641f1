//! Preparation on real text (Brown corpus, Tang poems; scripts/fetch-assets.sh) with planted exact
//! duplicates, near duplicates, ad lines and bad records: what is planted is removed and counted,
//! what is clean survives.

use std::io::Write;
use std::path::{Path, PathBuf};

use cpt_data::prepare::{prepare, PrepareConfig};
use cpt_data::report::Report;
use cpt_data::{Split, SplitReader};
use serde_json::json;
use tokenizers::Tokenizer;

fn assets() -> PathBuf {
    std::env::var_os("CPT_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/cpt/assets"))
}

fn corpus(name: &str, count: usize, min_chars: usize) -> Vec<String> {
    let path = assets().join("text").join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|_| panic!("{} is missing: run scripts/fetch-assets.sh", path.display()));
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["text"].as_str().unwrap().to_string())
        .filter(|t| t.chars().count() >= min_chars)
        .take(count)
        .collect()
}

/// A byte-level tokenizer with no merges (one token per byte) and `<|endoftext|>` = 256.
fn byte_tokenizer(dir: &Path) -> PathBuf {
    let alphabet: std::collections::BTreeSet<char> =
        tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet().into_iter().collect();
    let mut vocab: serde_json::Map<String, serde_json::Value> =
        alphabet.into_iter().enumerate().map(|(i, c)| (c.to_string(), i.into())).collect();
    vocab.insert("<|endoftext|>".into(), 256.into());
    let json = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": 256, "content": "<|endoftext|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": []},
    });
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, json.to_string()).unwrap();
    path
}

fn write_jsonl(path: &Path, docs: &[String]) {
    let mut file = std::fs::File::create(path).unwrap();
    for doc in docs {
        writeln!(file, "{}", json!({"text": doc})).unwrap();
    }
}

/// Every token of both splits, decoded.
fn decoded(dir: &Path, tokenizer: &Path) -> String {
    let tokenizer = Tokenizer::from_file(tokenizer).unwrap();
    let mut text = String::new();
    for split in [Split::Train, Split::Validation] {
        let reader = SplitReader::open(dir, split).unwrap();
        let ids: Vec<u32> = (0..reader.len()).flat_map(|i| reader.block(i)).collect();
        text += &tokenizer.decode(&ids, false).unwrap();
    }
    text
}

fn removed(report: &Report, rule: &str) -> u64 {
    report.document_rules.get(rule).or(report.line_rules.get(rule)).map_or(0, |s| s.removed)
}

const ADS: [&str; 3] = [
    "Subscribe to our newsletter for weekly updates!",
    "We use cookies to improve your experience.",
    "点击关注，获取更多精彩内容",
];

#[test]
fn planted_duplicates_ads_and_bad_records_are_removed_and_counted_while_clean_text_survives() {
    let tmp = tempfile::tempdir().unwrap();
    let tokenizer = byte_tokenizer(tmp.path());
    let brown = corpus("brown.jsonl", 30, 0);
    let poems = corpus("tang-poems.jsonl", 200, 100);
    let clean: Vec<String> = brown.iter().chain(&poems).cloned().collect();

    let mut planted = clean.clone();
    for (i, doc) in brown.iter().take(4).enumerate() {
        // Exact duplicates, up to case and whitespace.
        planted.push(if i % 2 == 0 { doc.to_uppercase() } else { doc.replace(' ', "  ") });
    }
    for doc in brown.iter().skip(4).take(3) {
        // Near duplicates: one word in 200 changed.
        let words: Vec<&str> =
            doc.split(' ').enumerate().map(|(i, w)| if i % 200 == 7 { "changed" } else { w }).collect();
        planted.push(words.join(" "));
    }
    for poem in poems.iter().take(3) {
        // Near duplicates: one character of a long poem changed.
        let mut chars: Vec<char> = poem.chars().collect();
        let middle = chars.len() / 2;
        chars[middle] = if chars[middle] == '月' { '日' } else { '月' };
        planted.push(chars.into_iter().collect());
    }
    for (i, doc) in planted.iter_mut().enumerate().take(60) {
        let ad = ADS[i % ADS.len()];
        *doc = format!("{ad}\n{doc}\n{ad}");
    }
    let (base_in, planted_in) = (tmp.path().join("base.jsonl"), tmp.path().join("planted"));
    write_jsonl(&base_in, &clean);
    std::fs::create_dir(&planted_in).unwrap();
    write_jsonl(&planted_in.join("docs.jsonl"), &planted);
    let mut bad = std::fs::File::create(planted_in.join("bad.jsonl")).unwrap();
    bad.write_all(b"{\"text\": \"fine but short\"}\n{broken json\n\xff\xfe not utf-8\n{\"body\": \"no text field\"}\n")
        .unwrap();

    let config = PrepareConfig { seq_len: 64, validation_fraction: 0.05, ..Default::default() };
    let (base_manifest, base) = prepare(&tokenizer, &[base_in], &tmp.path().join("base"), &config, |_| {}).unwrap();
    let (manifest, report) =
        prepare(&tokenizer, &[planted_in.clone()], &tmp.path().join("out"), &config, |_| {}).unwrap();

    assert_eq!(removed(&report, "exact_duplicate") - removed(&base, "exact_duplicate"), 4);
    assert_eq!(removed(&report, "near_duplicate") - removed(&base, "near_duplicate"), 6);
    assert_eq!(removed(&report, "boilerplate_line"), 120, "two planted ad lines in each of 60 documents");
    assert_eq!(report.bad_records, 3, "{:?}", report.bad_record_examples);
    assert!(report.bad_record_examples.iter().any(|b| b.contains("bad.jsonl:2") && b.contains("invalid JSON")));
    assert!(report.bad_record_examples.iter().any(|b| b.contains("bad.jsonl:3") && b.contains("UTF-8")));
    assert!(report.bad_record_examples.iter().any(|b| b.contains("bad.jsonl:4") && b.contains("`text`")));
    // "fine but short" is a document, and too short.
    assert_eq!(removed(&report, "too_short") - removed(&base, "too_short"), 1);
    // Clean documents survive: the same ones as without the plants, token for token.
    assert_eq!(report.documents_kept, base.documents_kept);
    assert_eq!(manifest.splits[&Split::Train].tokens, base_manifest.splits[&Split::Train].tokens);
    let text = decoded(&tmp.path().join("out"), &tokenizer);
    for ad in ADS {
        assert!(!text.contains(ad), "ad line `{ad}` survived");
    }
    let poem_start: String = poems[10].chars().take(10).collect();
    assert!(text.contains(&brown[0][..200]) && text.contains(&poem_start));
    let rule = &report.document_rules["exact_duplicate"];
    assert!(!rule.examples.is_empty() && rule.examples[0].origin.contains("docs.jsonl:"), "{rule:?}");
    assert!(report.table().contains("near_duplicate"));
}

#[test]
fn gzip_text_directories_and_globs_read_the_same_documents() {
    let tmp = tempfile::tempdir().unwrap();
    let tokenizer = byte_tokenizer(tmp.path());
    let docs = corpus("brown.jsonl", 12, 0);
    let plain = tmp.path().join("plain");
    std::fs::create_dir(&plain).unwrap();
    let txt: String = docs[..6].iter().map(|d| format!("{}\n\n", d.replace('\n', " "))).collect();
    std::fs::write(plain.join("a.txt"), &txt).unwrap();
    write_jsonl(&plain.join("b.jsonl"), &docs[6..]);
    let gz = tmp.path().join("gz");
    std::fs::create_dir(&gz).unwrap();
    for (name, bytes) in [
        ("a.txt.gz", std::fs::read(plain.join("a.txt")).unwrap()),
        ("b.jsonl.gz", std::fs::read(plain.join("b.jsonl")).unwrap()),
    ] {
        let mut encoder =
            flate2::write::GzEncoder::new(std::fs::File::create(gz.join(name)).unwrap(), flate2::Compression::fast());
        encoder.write_all(&bytes).unwrap();
        encoder.finish().unwrap();
    }
    let config = PrepareConfig { seq_len: 32, validation_fraction: 0.0, ..Default::default() };
    let (a, ra) = prepare(&tokenizer, &[plain.clone()], &tmp.path().join("da"), &config, |_| {}).unwrap();
    let pattern = PathBuf::from(format!("{}/*.gz", gz.display()));
    let (b, rb) = prepare(&tokenizer, &[pattern], &tmp.path().join("db"), &config, |_| {}).unwrap();
    assert_eq!((ra.documents_read, ra.documents_kept), (12, 12));
    assert_eq!((rb.documents_read, rb.documents_kept), (12, 12));
    assert_eq!(a.splits, b.splits.iter().map(|(k, v)| (*k, v.clone())).collect());
    let missing = prepare(&tokenizer, &[tmp.path().join("nothing-*.txt")], &tmp.path().join("dc"), &config, |_| {});
    assert!(missing.unwrap_err().to_string().contains("matches no file"));
}

#[test]
fn the_language_filter_keeps_only_the_requested_languages() {
    let tmp = tempfile::tempdir().unwrap();
    let tokenizer = byte_tokenizer(tmp.path());
    let docs: Vec<String> =
        corpus("brown.jsonl", 10, 0).into_iter().chain(corpus("tang-poems.jsonl", 10, 60)).collect();
    write_jsonl(&tmp.path().join("mixed.jsonl"), &docs);
    let mut config = PrepareConfig { seq_len: 32, ..Default::default() };
    config.clean.languages = vec!["eng".into()];
    let (_, report) =
        prepare(&tokenizer, &[tmp.path().join("mixed.jsonl")], &tmp.path().join("en"), &config, |_| {}).unwrap();
    assert_eq!((report.documents_kept, removed(&report, "language")), (10, 10));
}

#[test]
fn no_chinese_documentation_is_removed_by_the_word_rules() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/chinese-docs.txt");
    let text = std::fs::read_to_string(&fixture).unwrap();
    let cleaner = cpt_data::clean::Cleaner::new(Default::default()).unwrap();
    let documents: Vec<&str> = text.split("\n\n").collect();
    assert_eq!(documents.len(), 8);
    let removed: Vec<_> = documents
        .iter()
        .filter_map(|d| cleaner.clean(d).outcome.err().map(|rule| (rule, d.lines().next().unwrap())))
        .collect();
    assert!(removed.is_empty(), "removed (rule, heading): {removed:?}");
}

#[test]
fn a_tokenizer_that_truncates_or_pads_still_prepares_whole_documents() {
    let tmp = tempfile::tempdir().unwrap();
    let plain = byte_tokenizer(tmp.path());
    let mut json: serde_json::Value = serde_json::from_slice(&std::fs::read(&plain).unwrap()).unwrap();
    json["truncation"] = json!({"direction": "Right", "max_length": 16, "strategy": "LongestFirst", "stride": 0});
    json["padding"] = json!({"strategy": {"Fixed": 4096}, "direction": "Right", "pad_to_multiple_of": null,
                             "pad_id": 256, "pad_type_id": 0, "pad_token": "<|endoftext|>"});
    let truncating = tmp.path().join("truncating.json");
    std::fs::write(&truncating, json.to_string()).unwrap();
    let docs = corpus("brown.jsonl", 5, 500);
    write_jsonl(&tmp.path().join("docs.jsonl"), &docs);
    let config = PrepareConfig { seq_len: 32, validation_fraction: 0.0, ..Default::default() };
    let input = [tmp.path().join("docs.jsonl")];
    let (whole, _) = prepare(&plain, &input, &tmp.path().join("plain"), &config, |_| {}).unwrap();
    let (cut, _) = prepare(&truncating, &input, &tmp.path().join("cut"), &config, |_| {}).unwrap();
    assert!(whole.splits[&Split::Train].tokens > 5 * 500, "one token per byte: documents are longer than 16 tokens");
    assert_eq!(cut.splits[&Split::Train].tokens, whole.splits[&Split::Train].tokens, "truncation or padding applied");
}

#[test]
fn an_unbounded_config_fails_with_a_message_before_anything_is_read_or_allocated() {
    // A config stored before submissions were checked reaches a worker as is: it must fail the job,
    // not abort the worker (batch_documents of 1e15 did, on every attempt).
    let tmp = tempfile::tempdir().unwrap();
    let tokenizer = byte_tokenizer(tmp.path());
    write_jsonl(&tmp.path().join("docs.jsonl"), &corpus("brown.jsonl", 2, 0));
    let config = PrepareConfig { batch_documents: 1_000_000_000_000_000, ..Default::default() };
    let error = prepare(&tokenizer, &[tmp.path().join("docs.jsonl")], &tmp.path().join("out"), &config, |_| {})
        .unwrap_err()
        .to_string();
    assert!(error.contains("batch_documents"), "{error}");
    assert!(!tmp.path().join("out").exists(), "nothing is written");
}
