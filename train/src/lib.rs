//! cpt's training core: a trainable LLaMA-family model in candle, its weights in HuggingFace
//! layout, GGUF import, and perplexity/generation on text.
//!
//! Plain functions and small types: no async runtime and no database, so the worker can run any of
//! it on a dedicated thread and tests can call it directly.

pub use cpt_protocol::model_config as config;
pub mod adapter;
pub mod bench;
pub mod checkpoint;
pub mod device;
pub mod gguf;
pub mod hf;
pub mod kernel_check;
pub mod model;
pub mod optim;
pub mod params;
pub mod peak;
pub mod schedule;
pub mod step;
pub mod text;
pub mod trainer;
pub mod vocab;

pub use config::ModelConfig;
pub use hf::ModelDir;
pub use model::Llama;
pub use params::Params;
pub use trainer::{train, Outcome, RunOptions, StopFlag};
