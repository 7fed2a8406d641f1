//! Using a model on text: perplexity of a document, and continuations of a prompt.

use std::borrow::Cow;

use anyhow::{bail, Result};
use candle_core::{DType, Device, IndexOp, Tensor};
use rand::SeedableRng;
use rand_distr::{weighted::WeightedIndex, Distribution};
use serde::Serialize;
use tokenizers::Tokenizer;

use crate::model::{ops, Llama};

/// Mean next-token loss of a text.
#[derive(Debug, Clone, Serialize)]
pub struct Perplexity {
    /// Tokens in the text (special tokens the tokenizer adds included).
    pub tokens: usize,
    /// Tokens that were predicted: all but the first.
    pub scored_tokens: usize,
    /// Mean negative log-likelihood, nats per scored token.
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
}

/// Encodes text the way the model was trained (the tokenizer's own special-token conventions),
/// whole: a `tokenizer.json` may carry truncation or padding meant for batches of short inputs.
pub fn encode(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    let tokenizer = if tokenizer.get_truncation().is_some() || tokenizer.get_padding().is_some() {
        Cow::Owned(cpt_data::tokenize::whole_documents(tokenizer.clone())?)
    } else {
        Cow::Borrowed(tokenizer)
    };
    let encoding = tokenizer.encode(text, true).map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
    Ok(encoding.get_ids().to_vec())
}

/// Windows of at most `seq_len` inputs covering `ids`; consecutive windows share one token so that
/// every token after the first is predicted exactly once.
pub fn windows(ids: &[u32], seq_len: usize) -> impl Iterator<Item = &[u32]> {
    let count = (ids.len().saturating_sub(1)).div_ceil(seq_len.max(1));
    (0..count).map(move |w| &ids[w * seq_len..((w + 1) * seq_len + 1).min(ids.len())])
}

/// Loss and perplexity of `ids` under `model`, in windows of `seq_len` tokens.
pub fn perplexity(model: &Llama, ids: &[u32], seq_len: usize, device: &Device) -> Result<Perplexity> {
    if ids.len() < 2 {
        bail!("the text has {} token(s); at least 2 are needed to measure a loss", ids.len());
    }
    if seq_len == 0 {
        bail!("seq_len must be positive");
    }
    let mut total = 0.0f64;
    for window in windows(ids, seq_len) {
        let window = Tensor::new(window, device)?.unsqueeze(0)?;
        let (inputs, targets) = crate::model::shift(&window)?;
        let logits = model.forward(&inputs)?.squeeze(0)?;
        let nll = ops::token_nll(&logits, &targets.squeeze(0)?)?;
        total += nll.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
    }
    let scored = ids.len() - 1;
    let loss = total / scored as f64;
    Ok(Perplexity { tokens: ids.len(), scored_tokens: scored, loss, perplexity: loss.exp() })
}

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decoding {
    /// A seeded draw, or `None` for the most likely token.
    pub sampling: Option<Sampling>,
    /// CTRL's repetition penalty as transformers applies it (1: none): the logit of a token already
    /// in the context is divided by it when positive, multiplied when negative.
    pub repetition_penalty: f64,
}

/// A draw from the tokens that survive `top_k` and then `top_p` (nucleus), at `temperature`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    pub temperature: f64,
    pub top_k: usize,
    pub top_p: f64,
    pub seed: u64,
}

impl Decoding {
    /// The most likely token, no penalty.
    pub const GREEDY: Decoding = Decoding { sampling: None, repetition_penalty: 1.0 };
}

/// The next token after `context` from `logits` (one per vocabulary entry).
fn choose(mut logits: Vec<f32>, context: &[u32], decoding: &Decoding, rng: &mut impl rand::Rng) -> Result<u32> {
    if decoding.repetition_penalty != 1.0 {
        let penalty = decoding.repetition_penalty as f32;
        let (mut seen, vocab) = (std::collections::HashSet::new(), logits.len());
        for &id in context.iter().filter(|&&id| (id as usize) < vocab && seen.insert(id)) {
            let logit = &mut logits[id as usize];
            *logit = if *logit > 0.0 { *logit / penalty } else { *logit * penalty };
        }
    }
    let most_likely = || logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i as u32);
    let Some(sampling) = decoding.sampling else { return Ok(most_likely()) };
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    order.truncate(sampling.top_k.max(1));
    let top = logits[order[0]] as f64;
    let mut weights: Vec<f64> =
        order.iter().map(|&i| ((logits[i] as f64 - top) / sampling.temperature.max(1e-6)).exp()).collect();
    // Nucleus: the smallest prefix whose probability reaches top_p (at least one token).
    let total: f64 = weights.iter().sum();
    let mut mass = 0.0;
    let keep = weights.iter().position(|w| {
        mass += w / total;
        mass >= sampling.top_p
    });
    weights.truncate(keep.map_or(weights.len(), |i| i + 1));
    Ok(order[WeightedIndex::new(&weights)?.sample(rng)] as u32)
}

/// Continues `prompt` by up to `max_new_tokens` tokens, stopping early at an end-of-sequence token.
/// Returns only the continuation, never ending inside a character: the last up to three tokens are
/// dropped when they leave an incomplete UTF-8 sequence (a byte-level vocabulary splits characters).
pub fn generate(
    model: &Llama,
    tokenizer: &Tokenizer,
    prompt: &str,
    max_new_tokens: usize,
    decoding: Decoding,
    device: &Device,
) -> Result<String> {
    let mut ids = encode(tokenizer, prompt)?;
    if ids.is_empty() {
        bail!("the prompt is empty after tokenization");
    }
    let prompt_len = ids.len();
    let context = model.config().max_position_embeddings;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(decoding.sampling.map_or(0, |s| s.seed));
    for _ in 0..max_new_tokens {
        let start = ids.len().saturating_sub(context);
        let input = Tensor::new(&ids[start..], device)?.unsqueeze(0)?;
        let logits = model.forward(&input)?.i((0, ids.len() - start - 1))?.to_dtype(DType::F32)?;
        let next = choose(logits.to_vec1()?, &ids, &decoding, &mut rng)?;
        ids.push(next);
        if model.config().eos_token_ids.contains(&next) {
            break;
        }
    }
    let generated = &ids[prompt_len..];
    let decode = |ids: &[u32]| tokenizer.decode(ids, true).map_err(|e| anyhow::anyhow!("decoding: {e}"));
    let mut text = decode(generated)?;
    for cut in 1..=3.min(generated.len()) {
        if !text.ends_with('\u{FFFD}') {
            break;
        }
        text = decode(&generated[..generated.len() - cut])?;
    }
    Ok(text)
}
