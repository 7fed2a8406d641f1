//! Continuations: whole characters only, and seeded sampling.

mod common;

use candle_core::{DType, Device};
use cpt_train::text::{generate, Decoding, Sampling};
use cpt_train::Llama;
use serde_json::json;

#[test]
fn a_continuation_never_ends_inside_a_utf8_character() {
    // One token per byte and a random model: half of its tokens are bytes ≥ 0x80, so continuations
    // cut at a fixed length would often end inside a multi-byte character.
    let config = common::tiny_config("LlamaForCausalLM", json!({"vocab_size": 257}));
    let model = Llama::new(&config, &common::tiny_params(&config, 4, DType::F32)).unwrap();
    let tokenizer = common::byte_tokenizer();
    for seed in 0..24 {
        let sampling = Sampling { temperature: 1.0, top_k: 257, top_p: 1.0, seed };
        let decoding = Decoding { sampling: Some(sampling), repetition_penalty: 1.0 };
        let text = generate(&model, &tokenizer, "床前", 5, decoding, &Device::Cpu).unwrap();
        assert!(!text.ends_with('\u{FFFD}'), "seed {seed}: {text:?} ends with a broken character");
    }
}

#[test]
fn sampling_is_seeded_top_p_narrows_to_greedy_and_the_repetition_penalty_discourages_repeats() {
    let config = common::tiny_config("LlamaForCausalLM", json!({"vocab_size": 257}));
    let model = Llama::new(&config, &common::tiny_params(&config, 4, DType::F32)).unwrap();
    let tokenizer = common::byte_tokenizer();
    let run = |sampling: Option<Sampling>, repetition_penalty: f64| {
        let decoding = Decoding { sampling, repetition_penalty };
        generate(&model, &tokenizer, "abcabc", 12, decoding, &Device::Cpu).unwrap()
    };
    let sample = |seed, top_p| Some(Sampling { temperature: 1.0, top_k: 257, top_p, seed });
    assert_eq!(run(sample(3, 1.0), 1.0), run(sample(3, 1.0), 1.0), "one seed, one continuation");
    assert!((0..5).any(|seed| run(sample(seed, 1.0), 1.0) != run(sample(3, 1.0), 1.0)), "seeds matter");
    assert_eq!(run(sample(3, 1e-9), 1.0), run(None, 1.0), "a vanishing nucleus is the most likely token");
    let distinct = |text: String| text.bytes().collect::<std::collections::HashSet<_>>().len();
    let (plain, penalised) = (run(None, 1.0), run(None, 10.0));
    assert!(distinct(penalised.clone()) > distinct(plain.clone()), "{plain:?} vs {penalised:?}");
}
