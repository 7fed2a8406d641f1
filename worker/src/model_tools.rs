//! The model commands: import a GGUF file, export a HuggingFace directory, initialise a random
//! model, evaluate perplexity, generate a continuation.

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use cpt_train::text::{self, Decoding};
use cpt_train::{gguf, hf, Llama, ModelDir};

fn load_model(dir: &Path, device: &Device) -> Result<(ModelDir, Llama)> {
    let model_dir = ModelDir::open(dir)?;
    let params = model_dir.load_params(DType::F32, device)?;
    let model = Llama::new(&model_dir.config, &params)?;
    Ok((model_dir, model))
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

/// `cpt-worker export`.
pub fn export(source: &Path, out: &Path, dtype: DType) -> Result<()> {
    hf::export(source, out, dtype)?;
    println!("exported {} to {}", source.display(), out.display());
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
    let (model_dir, model) = load_model(model, device)?;
    let text = std::fs::read_to_string(text_path).with_context(|| format!("reading {}", text_path.display()))?;
    let ids = text::encode(&model_dir.tokenizer()?, &text)?;
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
    let (model_dir, model) = load_model(model, device)?;
    let tokenizer = model_dir.tokenizer()?;
    let continuation = text::generate(&model, &tokenizer, prompt, max_new_tokens, decoding, device)?;
    println!("{prompt}{continuation}");
    Ok(())
}
