//! The same bits whatever the thread count and whatever else the machine runs: every reduction in
//! the step splits by the data's shape, never by rayon's work stealing, so a job resumed by a
//! worker with another core count, or on a busy machine, continues exactly.

mod common;

use common::runs::{fixture, run, spec, Fixture};
use cpt_protocol::Event;
use serde_json::json;

/// A process that keeps a core busy until dropped, so that rayon's threads are preempted and its
/// work stealing splits work where it happens to.
struct CpuBurner(std::process::Child);

impl CpuBurner {
    fn start() -> CpuBurner {
        CpuBurner(std::process::Command::new("sh").args(["-c", "while :; do :; done"]).spawn().unwrap())
    }
}

impl Drop for CpuBurner {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What a run leaves that must not depend on the machine: per step (step, loss, gradient norm) as
/// bits, each eval's loss as bits, and the final weights' bytes.
#[derive(Debug, PartialEq)]
struct Trace {
    steps: Vec<(u64, u64, u64)>,
    evals: Vec<(u64, String, u64)>,
    weights: Vec<u8>,
}

/// Trains the fixture's spec with `extra` (micro-batches of 8 blocks, so each norm sums 128 rows) on
/// a pool of `threads` threads.
fn trained(f: &Fixture, extra: &serde_json::Value, threads: usize, name: &str) -> Trace {
    let mut changes = json!({"micro_batch_size": 8, "max_steps": 4, "eval_every": 2, "checkpoint_every": 4});
    changes.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    let spec = spec(&f.root, changes);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    let (outcome, events) = pool.install(|| run(&spec, &f.root.join(name), false, None));
    let outcome = outcome.unwrap();
    let steps = events
        .iter()
        .filter_map(|e| match e {
            Event::Step(m) => Some((m.step, m.loss.to_bits(), m.grad_norm.to_bits())),
            _ => None,
        })
        .collect();
    let evals = events
        .iter()
        .filter_map(|e| match e {
            Event::Eval { step, set, loss, .. } => Some((*step, set.clone(), loss.to_bits())),
            _ => None,
        })
        .collect();
    let file = ["model.safetensors", "adapter_model.safetensors"].map(|name| outcome.checkpoint.join(name));
    let weights = std::fs::read(file.iter().find(|f| f.exists()).unwrap()).unwrap();
    Trace { steps, evals, weights }
}

#[test]
fn training_gives_the_same_bits_at_one_two_and_three_threads_and_beside_a_cpu_burning_process() {
    let f = fixture(false);
    // The explicit step (every weight), and the autograd path with the fused kernels (an adapter
    // with trained embeddings).
    let adapter = json!({"adapter": {"lora": {"rank": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj", "down_proj"]},
                                     "modules_to_save": ["embed_tokens"]}});
    for (path, extra) in [("explicit", json!({})), ("adapter", adapter)] {
        let alone = trained(&f, &extra, 1, &format!("{path}-one-thread"));
        assert_eq!(alone.steps.len(), 4);
        for (threads, loaded) in [(2, false), (3, false), (2, true), (3, true), (2, true)] {
            let _burner = loaded.then(CpuBurner::start);
            let other = trained(&f, &extra, threads, &format!("{path}-threads-{threads}-loaded-{loaded}"));
            let case = format!("{path} at {threads} threads, loaded: {loaded}");
            assert_eq!(other.steps, alone.steps, "step losses and gradient norms, {case}");
            assert_eq!(other.evals, alone.evals, "eval losses, {case}");
            assert!(other.weights == alone.weights, "final weights, {case}");
        }
    }
}

/// Losses of a few benchmark steps (forward, backward, clipped AdamW on random tokens) of a model
/// whose products are large enough for gemm to thread and whose sequences span several attention
/// blocks and logits chunks, on a pool of `threads` threads.
fn bench_losses(autograd: bool, recompute_every: Option<usize>, threads: usize) -> Vec<u64> {
    let config = common::tiny_config(
        "LlamaForCausalLM",
        json!({"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 8, "num_key_value_heads": 2,
               "vocab_size": 4096, "max_position_embeddings": 512}),
    );
    let options = cpt_train::bench::BenchOptions {
        seq_len: 160,
        batch: 2,
        steps: 3,
        warmup: 0,
        kernels: Default::default(),
        device: candle_core::Device::Cpu,
        compute: candle_core::DType::F32,
        adapter: None,
        autograd,
        recompute_every,
        ignore_estimate: true,
    };
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    let report = pool.install(|| cpt_train::bench::bench(&config, &options)).unwrap();
    report.losses.iter().map(|l| l.to_bits()).collect()
}

#[test]
fn threaded_products_attention_blocks_and_recomputation_give_the_same_bits_at_any_thread_count() {
    for (autograd, recompute_every) in [(false, None), (false, Some(1)), (true, None)] {
        let alone = bench_losses(autograd, recompute_every, 1);
        assert_eq!(alone.len(), 3);
        for threads in [2, 3] {
            let other = bench_losses(autograd, recompute_every, threads);
            assert_eq!(other, alone, "autograd {autograd}, recompute_every {recompute_every:?}, {threads} threads");
        }
    }
}
