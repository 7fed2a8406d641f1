//! The model commands: import a GGUF file, export a HuggingFace directory, initialise a random
//! model, evaluate perplexity, generate a continuation.

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use cpt_data::StagedDir;
use cpt_train::text::{self, Decoding};
use cpt_train::{adapter, gguf, hf, Llama, ModelDir};
use tokenizers::Tokenizer;

/// A model directory, or an adapter directory over the base it names, ready to run; with the
/// tokenizer (an adapter's own when it has one).
fn load_model(dir: &Path, device: &Device) -> Result<(Tokenizer, Llama)> {
    if adapter::is_adapter_dir(dir) {
        let opened = adapter::open_dir(dir, device)?;
        let mut model = Llama::new(&opened.base.config, &opened.params)?;
        model.set_lora(adapter::settings(&opened.adapter));
        return Ok((opened.tokenizer, model));
    }
    let model_dir = ModelDir::open(dir)?;
    let params = model_dir.load_params(DType::F32, device)?;
    let model = Llama::new(&model_dir.config, &params)?;
    Ok((model_dir.tokenizer()?, model))
}

/// `cpt-worker import`.
pub fn import(path: &Path, out: &Path, dtype: DType) -> Result<()> {
    let config = gguf::import(path, out, dtype)?;
    println!(
        "imported {} ({} layers, hidden {}, vocab {}) into {}",
        path.display(),
        config.num_hidden_layers,
        config.hidden_size,
        config.vocab_size,
        out.display()
    );
    Ok(())
}

/// `cpt-worker export`: a model as a HF directory; an adapter as a PEFT adapter directory, or with
/// `merge` as a HF directory of the base with the adapter merged in.
pub fn export(source: &Path, out: &Path, dtype: DType, merge: bool) -> Result<()> {
    if !adapter::is_adapter_dir(source) {
        if merge {
            bail!("{}: --merge applies to adapters, and this is a whole model", source.display());
        }
        hf::export(source, out, dtype)?;
        println!("exported {} to {}", source.display(), out.display());
        return Ok(());
    }
    let opened = adapter::open_dir(source, &Device::Cpu)?;
    let tokenizer = &opened.tokenizer;
    if merge {
        let params = adapter::merged_params(&opened)?;
        let extra = hf::passthrough_files(&opened.base.path)?;
        let config_json = opened.base.config_json.clone();
        hf::write_model_dir(out, hf::ModelFiles { config_json, params: &params, dtype, tokenizer, extra })?;
        println!("merged {} into its base, written to {}", source.display(), out.display());
        return Ok(());
    }
    let staged = StagedDir::begin(out)?;
    let base = opened.base.path.display().to_string();
    adapter::write_adapter_files(&staged, &opened.params, &opened.adapter, &opened.base.config, &base)?;
    hf::write_tokenizer(&staged, tokenizer)?;
    staged.commit()?;
    println!("exported the adapter {} to {}", source.display(), out.display());
    Ok(())
}

/// `cpt-worker init`.
pub fn init(config: &Path, tokenizer: &Path, out: &Path, seed: u64) -> Result<()> {
    let config = hf::init_model_dir(config, tokenizer, out, seed)?;
    println!("initialised a {}-parameter model in {}", config.total_parameters(), out.display());
    Ok(())
}

/// `cpt-worker eval`: perplexity of a text file, optionally the first window's logits.
pub fn eval(model: &Path, text_path: &Path, seq_len: usize, save_logits: Option<&Path>, device: &Device) -> Result<()> {
    let (tokenizer, model) = load_model(model, device)?;
    let text = std::fs::read_to_string(text_path).with_context(|| format!("reading {}", text_path.display()))?;
    let ids = text::encode(&tokenizer, &text)?;
    let result = text::perplexity(&model, &ids, seq_len, device)?;
    if let Some(path) = save_logits {
        let window = text::windows(&ids, seq_len).next().expect("perplexity checked the length");
        let input = Tensor::new(window, device)?.unsqueeze(0)?;
        let logits = model.forward(&input)?.squeeze(0)?;
        let tensors =
            [("input_ids".to_string(), input.squeeze(0)?.to_dtype(DType::I64)?), ("logits".to_string(), logits)];
        cpt_train::params::write_safetensors(path, &tensors)?;
    }
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}

/// `cpt-worker generate`.
pub fn generate(model: &Path, prompt: &str, max_new_tokens: usize, decoding: Decoding, device: &Device) -> Result<()> {
    let (tokenizer, model) = load_model(model, device)?;
    let continuation = text::generate(&model, &tokenizer, prompt, max_new_tokens, decoding, device)?;
    println!("{prompt}{continuation}");
    Ok(())
}

/// `cpt-worker extend-vocab`: prints the extension report (added tokens, fertility) as JSON.
pub fn extend_vocab(
    model: &Path,
    corpus: &[std::path::PathBuf],
    new_tokens: usize,
    min_frequency: u64,
    texts: &[std::path::PathBuf],
    out: &Path,
) -> Result<()> {
    if new_tokens == 0 {
        bail!("--new-tokens must be positive");
    }
    let report = cpt_train::vocab::extend(model, corpus, new_tokens, min_frequency, texts, out)?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
