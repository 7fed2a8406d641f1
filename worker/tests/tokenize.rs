//! `prepare`'s document tokenizer against HF `tokenizers`' own encoding of whole documents, with
//! SmolLM2's vocabulary under each byte-level pre-tokenizer the GGUF importer writes (GPT-2, SmolLM,
//! Llama 3, Qwen 2), a BOS-adding post-processor, and tokenizers the chunk cache must not take.

mod common;

use cpt_data::tokenize::DocumentTokenizer;
use serde_json::{json, Value};
use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer, Tokenizer};

const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn byte_level(use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

fn split_then_byte_level(pattern: &str) -> Value {
    json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false}, byte_level(false)]})
}

/// Real text, and random strings over the characters where splitting rules differ: kinds of
/// whitespace, digits, contractions, punctuation, CJK, emoji, combining marks, a special token.
fn texts() -> Vec<String> {
    let mut texts: Vec<String> = ["brown.jsonl", "tang-poems.jsonl"]
        .iter()
        .flat_map(|name| {
            let path = common::assets().join("text").join(name);
            let text = std::fs::read_to_string(&path).unwrap_or_else(|_| panic!("{} is missing", path.display()));
            text.lines()
                .take(60)
                .map(|l| serde_json::from_str::<Value>(l).unwrap()["text"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    let pieces = [
        " ",
        " ",
        " ",
        "a",
        "word",
        "Z",
        "'",
        "'s",
        "'LL",
        "s",
        "1",
        "2",
        "345",
        ".",
        ",",
        "(",
        "\n",
        "\t",
        "\r\n",
        "\u{a0}",
        "\u{3000}",
        "\u{b}",
        "\u{85}",
        "\u{2028}",
        "中",
        "文字",
        "😀",
        "é",
        "e\u{301}",
        "<|endoftext|>",
        "<|im_start|>",
        "--",
        "，",
        "。",
        "「",
        "」",
        "…",
        "—",
        "_",
        "|",
        "<",
        ">",
        "<jupyter_text>",
        "x<|im_end|>",
        "ि",
        "।",
        "\u{9fff}",
        "कि।",
        "e\u{301}.",
    ];
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..3000 {
        let mut text = String::new();
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        for _ in 0..(state >> 59) * 2 {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            text += pieces[(state >> 33) as usize % pieces.len()];
        }
        texts.push(text);
    }
    texts.push(String::new());
    texts
}

/// HF's pre-tokens of `text` (byte-level strings), without added-token extraction.
fn pre_tokens(tokenizer: &Tokenizer, text: &str) -> Vec<String> {
    let mut pre_tokenized = PreTokenizedString::from(text);
    tokenizer.get_pre_tokenizer().unwrap().pre_tokenize(&mut pre_tokenized).unwrap();
    pre_tokenized
        .get_splits(OffsetReferential::Original, OffsetType::Byte)
        .into_iter()
        .map(|(s, _, _)| s.to_string())
        .collect()
}

#[test]
fn documents_encode_exactly_as_hf_tokenizers_under_every_byte_level_pre_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let smol = common::import_smollm2(tmp.path());
    let base: Value = serde_json::from_slice(&std::fs::read(smol.join("tokenizer.json")).unwrap()).unwrap();
    let bos_template = json!({"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
        {"Sequence": {"id": "A", "type_id": 0}}], "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}}});
    let variants: Vec<(&str, Vec<(&str, Value)>, bool)> = vec![
        ("smollm (as imported)", vec![], true),
        ("gpt2", vec![("pre_tokenizer", byte_level(true))], true),
        ("llama3", vec![("pre_tokenizer", split_then_byte_level(LLAMA3))], true),
        ("qwen2", vec![("pre_tokenizer", split_then_byte_level(QWEN2))], true),
        (
            "llama3 with BOS",
            vec![("pre_tokenizer", split_then_byte_level(LLAMA3)), ("post_processor", bos_template)],
            true,
        ),
        ("NFKC normalizer", vec![("normalizer", json!({"type": "NFKC"}))], false),
        (
            "prefix space",
            vec![(
                "pre_tokenizer",
                json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}),
            )],
            false,
        ),
        ("no regex", vec![("pre_tokenizer", byte_level(false))], false),
    ];
    let texts = texts();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    for (name, changes, chunked) in variants {
        let mut json = base.clone();
        for (field, value) in changes {
            json[field] = value;
        }
        let hf: Tokenizer = json.to_string().parse().unwrap();
        let ours = DocumentTokenizer::new(hf.clone()).unwrap();
        assert_eq!(ours.is_chunked(), chunked, "{name}");
        // Every chunk boundary is a boundary of HF's own pre-tokenization of the whole text, whatever
        // merges the vocabulary happens to have.
        if chunked {
            for text in &refs {
                let pieces: Vec<String> = ours.chunks(text).flat_map(|chunk| pre_tokens(&hf, chunk)).collect();
                assert_eq!(pieces, pre_tokens(&hf, text), "{name}: {text:?}");
            }
        }
        // Twice: the second pass reads every chunk from the cache.
        for pass in 0..2 {
            let encoded = ours.encode_batch(&refs).unwrap();
            for (text, ids) in refs.iter().zip(encoded) {
                assert_eq!(ids, hf.encode(*text, true).unwrap().get_ids(), "{name}, pass {pass}: {text:?}");
            }
        }
    }
}
