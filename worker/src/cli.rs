//! Command-line interface: the subcommands and their flags; each runs a function of its module
//! (`model_tools`, `run`, `watch`, `run_local`, `bench`).

use std::path::PathBuf;

use anyhow::Result;
use candle_core::DType;
use clap::{Parser, Subcommand, ValueEnum};
use cpt_train::text::{Decoding, Sampling};

/// cpt worker and model tools.
#[derive(Parser)]
#[command(version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Where to compute: `cpu`, or `cuda:N` (builds with `--features cuda`); one process per GPU.
    #[arg(long, global = true, env = "CPT_DEVICE", default_value = "cpu")]
    device: String,
}

/// Storage dtype of written weights.
#[derive(Clone, Copy, ValueEnum)]
enum WeightDtype {
    F32,
    Bf16,
    F16,
}

impl From<WeightDtype> for DType {
    fn from(d: WeightDtype) -> Self {
        match d {
            WeightDtype::F32 => DType::F32,
            WeightDtype::Bf16 => DType::BF16,
            WeightDtype::F16 => DType::F16,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Convert a GGUF file (llama architecture) into a new HuggingFace model directory.
    Import {
        /// The .gguf file.
        gguf: PathBuf,
        /// Output directory (must not exist).
        #[arg(long)]
        out: PathBuf,
        /// Storage dtype of the written weights.
        #[arg(long, value_enum, default_value = "f32")]
        dtype: WeightDtype,
    },
    /// Write a model directory or checkpoint as a HuggingFace directory transformers loads as is.
    Export {
        /// A model directory or a checkpoint directory.
        source: PathBuf,
        /// Output directory (must not exist).
        #[arg(long)]
        out: PathBuf,
        /// Storage dtype of a model's weights (an adapter's tensors stay f32, as PEFT writes them).
        #[arg(long, value_enum, default_value = "bf16")]
        dtype: WeightDtype,
        /// For an adapter (checkpoint): merge it into its base and write a plain model directory,
        /// instead of a PEFT adapter directory.
        #[arg(long)]
        merge: bool,
    },
    /// Write a randomly initialised model of any shape in HuggingFace layout.
    Init {
        /// A HuggingFace config.json giving the shape.
        #[arg(long)]
        config: PathBuf,
        /// The tokenizer.json to ship with the model.
        #[arg(long)]
        tokenizer: PathBuf,
        /// Output directory (must not exist).
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Print the loss and perplexity of a text file as one JSON object.
    Eval {
        #[arg(long)]
        model: PathBuf,
        /// A UTF-8 text file.
        #[arg(long)]
        text: PathBuf,
        /// Tokens per window.
        #[arg(long, default_value_t = 512)]
        seq_len: usize,
        /// Also write the first window's `input_ids` and `logits` to this safetensors file.
        #[arg(long)]
        save_logits: Option<PathBuf>,
    },
    /// Lease jobs from a cpt-server and run them until stopped.
    Run {
        /// The server's base URL, e.g. http://127.0.0.1:8080.
        #[arg(long, env = "CPT_SERVER")]
        server: String,
        /// The server's worker token.
        #[arg(long, env = "CPT_WORKER_TOKEN")]
        token: Option<String>,
        /// A name shown in the server's worker list.
        #[arg(long, default_value = "cpu-worker")]
        name: String,
        /// Where run directories (checkpoints, events) are kept: <data-dir>/runs/<job-id>.
        #[arg(long, env = "CPT_DATA_DIR", default_value = "cpt-data")]
        data_dir: PathBuf,
        /// Events kept on disk while the server is unreachable, at most (bytes); training waits
        /// beyond that rather than drop any.
        #[arg(long, default_value_t = crate::spool::DEFAULT_MAX_BYTES)]
        event_spool_bytes: u64,
    },
    /// Follow a job on a server: live progress, then learning versus forgetting per eval set.
    /// Exits non-zero unless the job succeeds.
    Watch {
        /// The job's id.
        job: String,
        /// The server's base URL.
        #[arg(long, env = "CPT_SERVER", default_value = "http://127.0.0.1:8080")]
        server: String,
        /// The server's API token.
        #[arg(long, env = "CPT_API_TOKEN")]
        token: Option<String>,
    },
    /// A sweep's comparison table: per job, its grid point, state, progress and, per eval set,
    /// the final perplexity, its change from step 0 and the best one.
    Sweep {
        /// The sweep's id.
        sweep: String,
        #[arg(long, env = "CPT_SERVER", default_value = "http://127.0.0.1:8080")]
        server: String,
        /// The server's API token.
        #[arg(long, env = "CPT_API_TOKEN")]
        token: Option<String>,
        /// Also save its learning-versus-forgetting plot (SVG) here.
        #[arg(long)]
        plot: Option<PathBuf>,
    },
    /// Run a job spec standalone; events go to <run-dir>/events.jsonl.
    Train {
        /// A job spec (JSON, the schema of `POST /v1/jobs`).
        #[arg(long)]
        spec: PathBuf,
        #[arg(long)]
        run_dir: PathBuf,
        /// Continue from the newest valid checkpoint in the run directory.
        #[arg(long)]
        resume: bool,
        /// Checkpoint and exit after this step.
        #[arg(long)]
        stop_after_steps: Option<u64>,
    },
    /// Tokenize and pack text (.txt, .jsonl; files or directories) into a dataset directory.
    Prepare {
        #[arg(long)]
        tokenizer: PathBuf,
        #[arg(long, required = true, num_args = 1..)]
        input: Vec<PathBuf>,
        /// Output dataset directory (must not exist).
        #[arg(long)]
        out: PathBuf,
        /// Tokens per block (overrides the config file).
        #[arg(long)]
        seq_len: Option<usize>,
        /// A JSON preparation config (see `PrepareConfig`).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Time full training steps (forward, backward, AdamW) of a random model on random tokens;
    /// prints a JSON report (tokens/s, GFLOP/s, peak memory). See bench/train_speed.sh.
    Bench {
        /// A model config.json (e.g. bench/configs/reference.json).
        #[arg(long)]
        config: PathBuf,
        #[arg(long, default_value_t = 256)]
        seq_len: usize,
        #[arg(long, default_value_t = 8)]
        batch: usize,
        /// Timed steps (the median is reported), after --warmup untimed ones.
        #[arg(long, default_value_t = 10)]
        steps: usize,
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// The implementation of the model's operations: best (for the device), cpu (whole-block CPU
        /// kernels), portable (the fused ops with CPU and CUDA kernels), composed (the reference).
        #[arg(long, default_value_t = cpt_train::model::Kernels::Best)]
        kernels: cpt_train::model::Kernels,
        /// bf16 compute over f32 master weights (CUDA).
        #[arg(long)]
        bf16: bool,
        /// Train an adapter over a frozen base: a JSON file holding a job spec's `adapter` section.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Take gradients through candle's autograd over the chosen kernels, not the explicit step
        /// (which full f32 training on the CPU takes otherwise).
        #[arg(long)]
        autograd: bool,
        /// Keep every k-th layer's input and recompute the activations in between (explicit step).
        #[arg(long)]
        recompute_every: Option<usize>,
        /// Run even when the plan's memory estimate, an upper bound, exceeds this machine's memory
        /// (to measure what a shape really needs).
        #[arg(long)]
        ignore_estimate: bool,
    },
    /// Check the fused ops on --device against the composed ops on the CPU in f64 (outputs and
    /// gradients, in each dtype the device's kernels store); exits non-zero when one is off.
    CheckKernels,
    /// Extend a model's vocabulary for a domain's language: train a BPE on the corpus, append its
    /// new tokens and merges to the tokenizer (no existing id changes) and write a model whose new
    /// embedding and output rows are the mean of each new token's pieces under the old tokenizer.
    ExtendVocab {
        /// The base model directory (byte-level BPE tokenizer).
        #[arg(long)]
        model: PathBuf,
        /// Domain text: files, directories or glob patterns of .txt/.jsonl (optionally .gz).
        #[arg(long, required = true, num_args = 1..)]
        corpus: Vec<PathBuf>,
        /// Tokens to add (at most; fewer when the corpus has fewer frequent merges).
        #[arg(long)]
        new_tokens: usize,
        /// A merge must occur this often in the corpus.
        #[arg(long, default_value_t = 2)]
        min_frequency: u64,
        /// Texts whose fertility (tokens per 1000 characters) is reported before and after.
        #[arg(long, num_args = 0..)]
        report_text: Vec<PathBuf>,
        /// Output directory (must not exist).
        #[arg(long)]
        out: PathBuf,
    },
    /// Continue a prompt (greedy unless --temperature is given).
    Generate {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 32)]
        max_new_tokens: usize,
        /// Sample at this temperature instead of decoding greedily.
        #[arg(long)]
        temperature: Option<f64>,
        /// With --temperature: sample among the k most likely tokens.
        #[arg(long, default_value_t = 50)]
        top_k: usize,
        /// With --temperature: then keep the most likely tokens whose probability reaches p.
        #[arg(long, default_value_t = 1.0)]
        top_p: f64,
        /// Divide (multiply, when negative) the logits of tokens already in the context by this.
        #[arg(long, default_value_t = 1.0)]
        repetition_penalty: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

impl Cli {
    /// Runs the chosen subcommand: each is a function in the module of its kind.
    pub fn run(self) -> Result<()> {
        let device = cpt_train::device::parse(&self.device)?;
        match self.command {
            Command::Import { gguf, out, dtype } => crate::model_tools::import(&gguf, &out, dtype.into()),
            Command::Export { source, out, dtype, merge } => {
                crate::model_tools::export(&source, &out, dtype.into(), merge)
            }
            Command::Init { config, tokenizer, out, seed } => crate::model_tools::init(&config, &tokenizer, &out, seed),
            Command::Eval { model, text, seq_len, save_logits } => {
                crate::model_tools::eval(&model, &text, seq_len, save_logits.as_deref(), &device)
            }
            Command::Generate {
                model,
                prompt,
                max_new_tokens,
                temperature,
                top_k,
                top_p,
                repetition_penalty,
                seed,
            } => {
                let decoding = match temperature {
                    Some(temperature) => {
                        Decoding { sampling: Some(Sampling { temperature, top_k, top_p, seed }), repetition_penalty }
                    }
                    None => Decoding { sampling: None, repetition_penalty },
                };
                crate::model_tools::generate(&model, &prompt, max_new_tokens, decoding, &device)
            }
            Command::Run { server, token, name, data_dir, event_spool_bytes } => {
                let config = crate::run::WorkerConfig {
                    server,
                    token,
                    name,
                    data_dir,
                    spool_max_bytes: event_spool_bytes,
                    device,
                };
                tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(crate::run::run(config))
            }
            Command::Watch { job, server, token } => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(crate::watch::watch(server, token, &job)),
            Command::Sweep { sweep, server, token, plot } => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(crate::sweep::show(server, token, &sweep, plot.as_deref())),
            Command::Train { spec, run_dir, resume, stop_after_steps } => {
                crate::run_local::train_command(&spec, &run_dir, resume, stop_after_steps, device)
            }
            Command::Prepare { tokenizer, input, out, seq_len, config } => {
                crate::run_local::prepare_command(&tokenizer, &input, &out, seq_len, config.as_deref())
            }
            Command::Bench {
                config,
                seq_len,
                batch,
                steps,
                warmup,
                kernels,
                bf16,
                adapter,
                autograd,
                recompute_every,
                ignore_estimate,
            } => {
                let compute = if bf16 { DType::BF16 } else { DType::F32 };
                let adapter = adapter.as_deref().map(crate::bench::read_adapter).transpose()?;
                let options = cpt_train::bench::BenchOptions {
                    seq_len,
                    batch,
                    steps,
                    warmup,
                    kernels,
                    device,
                    compute,
                    adapter,
                    autograd,
                    recompute_every,
                    ignore_estimate,
                };
                crate::bench::bench(&config, &options)
            }
            Command::CheckKernels => crate::bench::check_kernels(&device),
            Command::ExtendVocab { model, corpus, new_tokens, min_frequency, report_text, out } => {
                crate::model_tools::extend_vocab(&model, &corpus, new_tokens, min_frequency, &report_text, &out)
            }
        }
    }
}
