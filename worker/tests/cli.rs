//! The `cpt-worker` binary on the real SmolLM2-135M (fetched by scripts/fetch-assets.sh) and on tiny
//! models it initialises itself.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

fn worker(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cpt-worker")).args(args).output().expect("cpt-worker runs")
}

fn succeed(args: &[&str]) -> String {
    let output = worker(args);
    assert!(output.status.success(), "cpt-worker {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).expect("utf-8 output")
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// SmolLM2-135M imported once per test run.
fn smollm2() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let out = common::import_smollm2(tmp.path());
        (tmp, out)
    })
    .1
}

fn eval(model: &Path, text: &Path) -> serde_json::Value {
    let stdout = succeed(&["eval", "--model", model.to_str().unwrap(), "--text", text.to_str().unwrap()]);
    serde_json::from_str(stdout.trim()).expect("eval prints one JSON object")
}

#[test]
fn imported_smollm2_finds_prose_likely_and_shuffled_words_unlikely() {
    let paragraph = repo_root().join("tests/fixtures/english.txt");
    let text = std::fs::read_to_string(&paragraph).unwrap();
    // A fixed permutation (stride 7 over the word list) keeps the test deterministic.
    let words: Vec<&str> = text.split_whitespace().collect();
    assert_ne!(words.len() % 7, 0, "the stride must be coprime with the word count");
    let shuffled: Vec<&str> = (0..words.len()).map(|i| words[(i * 7) % words.len()]).collect();
    let tmp = tempfile::tempdir().unwrap();
    let shuffled_path = tmp.path().join("shuffled.txt");
    std::fs::write(&shuffled_path, shuffled.join(" ")).unwrap();

    let prose = eval(smollm2(), &paragraph);
    let noise = eval(smollm2(), &shuffled_path);
    let (prose_ppl, noise_ppl) = (prose["perplexity"].as_f64().unwrap(), noise["perplexity"].as_f64().unwrap());
    assert!((5.0..40.0).contains(&prose_ppl), "prose perplexity {prose_ppl}");
    assert!(noise_ppl > 200.0, "shuffled perplexity {noise_ppl}");
    let loss = prose["loss"].as_f64().unwrap();
    assert!((loss.exp() - prose_ppl).abs() < 1e-9 * prose_ppl);
    assert_eq!(prose["scored_tokens"].as_u64().unwrap() + 1, prose["tokens"].as_u64().unwrap());
}

#[test]
fn imported_smollm2_knows_the_capital_of_france() {
    let prompt = "The capital of France is";
    let out =
        succeed(&["generate", "--model", smollm2().to_str().unwrap(), "--prompt", prompt, "--max-new-tokens", "6"]);
    assert!(out.starts_with(prompt), "{out}");
    assert!(out[prompt.len()..].contains("Paris"), "continuation: {out}");
}

#[test]
fn sampling_is_reproducible_from_its_seed() {
    let model = smollm2().to_str().unwrap();
    let args = |seed: &'static str| {
        [
            "generate",
            "--model",
            model,
            "--prompt",
            "Once upon a time",
            "--max-new-tokens",
            "8",
            "--temperature",
            "1.0",
            "--seed",
            seed,
        ]
    };
    assert_eq!(succeed(&args("3")), succeed(&args("3")));
}

#[test]
fn a_randomly_initialised_model_is_as_uncertain_as_its_vocabulary_is_large() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("config.json");
    let vocab = 49152;
    let json = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "vocab_size": vocab, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": true, "bos_token_id": 1, "eos_token_id": 2,
    });
    std::fs::write(&config, json.to_string()).unwrap();
    let out = tmp.path().join("tiny");
    let tokenizer = smollm2().join("tokenizer.json");
    succeed(&[
        "init",
        "--config",
        config.to_str().unwrap(),
        "--tokenizer",
        tokenizer.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--seed",
        "1",
    ]);
    let result = eval(&out, &repo_root().join("tests/fixtures/english.txt"));
    let ppl = result["perplexity"].as_f64().unwrap();
    // With N(0, 0.02) weights the logits are nearly flat: perplexity ≈ vocabulary size.
    assert!((ppl / vocab as f64 - 1.0).abs() < 0.1, "perplexity {ppl} for vocab {vocab}");
}

#[test]
fn a_tokenizer_that_truncates_still_has_the_whole_text_scored() {
    let tmp = tempfile::tempdir().unwrap();
    let plain = smollm2().join("tokenizer.json");
    let mut json: serde_json::Value = serde_json::from_slice(&std::fs::read(&plain).unwrap()).unwrap();
    json["truncation"] =
        serde_json::json!({"direction": "Right", "max_length": 16, "strategy": "LongestFirst", "stride": 0});
    let truncating = tmp.path().join("tokenizer.json");
    std::fs::write(&truncating, json.to_string()).unwrap();
    let config = tmp.path().join("config.json");
    let shape = serde_json::json!({"architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 32,
        "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "tie_word_embeddings": true});
    std::fs::write(&config, shape.to_string()).unwrap();
    let out = tmp.path().join("tiny");
    let p = |path: &Path| path.to_str().unwrap().to_string();
    succeed(&["init", "--config", &p(&config), "--tokenizer", &p(&truncating), "--out", &p(&out)]);
    let text = repo_root().join("tests/fixtures/english.txt");
    let whole = tokenizers::Tokenizer::from_file(&plain)
        .unwrap()
        .encode(std::fs::read_to_string(&text).unwrap(), true)
        .unwrap()
        .len();
    assert!(whole > 16);
    assert_eq!(eval(&out, &text)["tokens"].as_u64().unwrap() as usize, whole, "the text was truncated");
}

#[test]
fn bad_inputs_fail_with_a_message_naming_the_file() {
    let output = worker(&["eval", "--model", "/nonexistent/model", "--text", "/nonexistent/text.txt"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("/nonexistent/model/config.json"), "{stderr}");

    let tmp = tempfile::tempdir().unwrap();
    let bogus = tmp.path().join("bogus.gguf");
    std::fs::write(&bogus, b"not a gguf file at all").unwrap();
    let output = worker(&["import", bogus.to_str().unwrap(), "--out", tmp.path().join("out").to_str().unwrap()]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("bogus.gguf"), "{stderr}");
    assert!(!tmp.path().join("out").exists());
}
