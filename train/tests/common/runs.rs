//! A tiny model and datasets on disk, and runs of the training loop over them.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use cpt_data::format::TailPolicy;
use cpt_data::{DatasetWriter, Split, TokenizerInfo};
use cpt_protocol::{Event, JobSpec};
use cpt_train::hf::{write_model_dir, ModelFiles};
use cpt_train::{train, ModelConfig, Outcome, RunOptions, StopFlag};
use serde_json::json;

pub struct Fixture {
    _tmp: tempfile::TempDir,
    pub root: PathBuf,
}

/// A tiny base model, a "domain" and a "general" dataset of 16-token blocks, and a "foreign" one of
/// bytes 200–255 alone (which training on the others makes less likely).
pub fn fixture(poison: bool) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let config_json = super::tiny_config_json("LlamaForCausalLM", json!({}));
    let config = ModelConfig::from_json(&config_json).unwrap();
    let params = super::tiny_params(&config, 3, DType::F32);
    if poison {
        let var = params.iter().find(|(n, _)| *n == "model.norm.weight").unwrap().1;
        var.set(&(var.as_tensor() * f64::NAN).unwrap()).unwrap();
    }
    let tokenizer = super::byte_tokenizer();
    let files = ModelFiles { config_json, params: &params, dtype: DType::F32, tokenizer: &tokenizer, extra: vec![] };
    write_model_dir(&root.join("base"), files).unwrap();
    let tokenizer_sha256 = cpt_data::sha256_file(&root.join("base/tokenizer.json")).unwrap();
    for (name, offset) in [("domain", 1u32), ("general", 7)] {
        let info = TokenizerInfo { sha256: tokenizer_sha256.clone(), vocab_size: 257, eos_token_id: 256 };
        let mut writer = DatasetWriter::create(&root.join(name), 16, info).unwrap();
        for doc in 0..120u32 {
            let tokens: Vec<u32> = (0..(5 + doc % 11)).map(|i| (doc * offset + i * 13) % 256).collect();
            let split = if doc % 10 == 0 { Split::Validation } else { Split::Train };
            writer.push_document(split, &tokens).unwrap();
        }
        writer.finish(TailPolicy::Pad, vec![], serde_json::Value::Null).unwrap();
    }
    let info = TokenizerInfo { sha256: tokenizer_sha256, vocab_size: 257, eos_token_id: 256 };
    let mut writer = DatasetWriter::create(&root.join("foreign"), 16, info).unwrap();
    for doc in 0..40u32 {
        let tokens: Vec<u32> = (0..16).map(|i| 200 + (doc * 5 + i * 7) % 56).collect();
        writer.push_document(Split::Validation, &tokens).unwrap();
    }
    writer.finish(TailPolicy::Pad, vec![], serde_json::Value::Null).unwrap();
    Fixture { _tmp: tmp, root }
}

pub fn spec(root: &Path, extra: serde_json::Value) -> JobSpec {
    let p = |name: &str| root.join(name).display().to_string();
    let mut spec = json!({
        "name": "tiny",
        "base_model": p("base"),
        "train_data": [{"dataset": p("domain"), "weight": 3.0}, {"dataset": p("general"), "weight": 1.0}],
        "eval_data": {"domain": p("domain"), "general": p("general")},
        "seq_len": 16, "micro_batch_size": 2, "grad_accum_steps": 2,
        "lr": 3e-3, "schedule": "cosine", "warmup_steps": 3, "max_steps": 10,
        "eval_every": 4, "eval_blocks": 4, "checkpoint_every": 4, "keep_checkpoints": 2,
        "sample_prompts": ["ab"], "sample_every": 5, "sample_tokens": 3,
    });
    for (k, v) in extra.as_object().unwrap() {
        spec[k] = v.clone();
    }
    serde_json::from_value(spec).unwrap()
}

pub fn run(
    spec: &JobSpec,
    run_dir: &Path,
    resume: bool,
    stop_after: Option<u64>,
) -> (anyhow::Result<Outcome>, Vec<Event>) {
    let mut events = Vec::new();
    let options = RunOptions { resume, stop_after_steps: stop_after, device: Device::Cpu };
    let outcome = train(spec, run_dir, &options, &StopFlag::default(), |e| events.push(e));
    (outcome, events)
}
