//! The `adapter` section of a job spec: train LoRA adapters over a frozen base (PEFT's LoRA), and
//! optionally the embeddings and output layer in full (PEFT's `modules_to_save`), each with its
//! own learning rate.

use serde::{Deserialize, Serialize};

use crate::spec::FieldError;

/// The projections LoRA can adapt, by their HuggingFace module names.
pub const LORA_TARGETS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// The modules that can be trained in full beside the adapters.
pub const SAVED_MODULES: [&str; 2] = ["embed_tokens", "lm_head"];

/// Largest LoRA rank a spec may ask for.
pub const MAX_RANK: usize = 4096;

/// What an adapter job trains; everything else is frozen and has no gradient or optimizer state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterSpec {
    /// Low-rank adapters on some projections; absent to train only `modules_to_save`.
    #[serde(default)]
    pub lora: Option<LoraSpec>,
    /// Modules trained in full: `embed_tokens`, `lm_head` (with tied embeddings they are one tensor).
    #[serde(default)]
    pub modules_to_save: Vec<String>,
    /// Peak learning rate of `modules_to_save` (typically 2–10× below the adapters'); it follows
    /// the same schedule. Absent: the job's learning rate.
    #[serde(default)]
    pub embedding_lr: Option<f64>,
    /// The dtype the frozen base is held in: `bf16` (default), `f16` or `f32`. Trained tensors and
    /// their optimizer state are always f32.
    #[serde(default)]
    pub base_dtype: BaseDtype,
    /// A PEFT adapter directory (`adapter_config.json`, `adapter_model.safetensors`) whose tensors
    /// start the trained ones, instead of PEFT's initialisation.
    #[serde(default)]
    pub init_from: Option<String>,
    /// Train only the rows of `modules_to_save` from this token id on — the rows `extend-vocab`
    /// added (its report's `base_vocab_size`); the others stay exactly as they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_rows_from: Option<usize>,
}

/// LoRA's hyper-parameters, as PEFT's `LoraConfig` names them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSpec {
    pub rank: usize,
    /// The update is scaled by `alpha / rank` (`alpha / √rank` with `rslora`).
    pub alpha: f64,
    /// Dropout on the adapters' input during training.
    #[serde(default)]
    pub dropout: f64,
    /// Projections to adapt (see [`LORA_TARGETS`]).
    pub target_modules: Vec<String>,
    /// Rank-stabilised scaling (Kalajdzievski 2023).
    #[serde(default)]
    pub rslora: bool,
}

impl LoraSpec {
    /// The factor the low-rank update `B·A` is scaled by.
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }
}

/// The dtype of an adapter job's frozen base weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BaseDtype {
    #[default]
    Bf16,
    F16,
    F32,
}

impl BaseDtype {
    /// Bytes per element.
    pub fn size(self) -> u64 {
        match self {
            BaseDtype::F32 => 4,
            BaseDtype::Bf16 | BaseDtype::F16 => 2,
        }
    }
}

fn problem(field: &str, message: impl Into<String>) -> FieldError {
    FieldError { field: format!("adapter.{field}"), message: message.into() }
}

impl AdapterSpec {
    /// Checks ranges and names; errors name the field under `adapter.`.
    pub fn validate(&self) -> Result<(), FieldError> {
        if self.lora.is_none() && self.modules_to_save.is_empty() {
            return Err(problem("lora", "an adapter needs `lora`, `modules_to_save` or both"));
        }
        if let Some(lora) = &self.lora {
            if lora.rank == 0 || lora.rank > MAX_RANK {
                return Err(problem("lora.rank", format!("must be in 1..={MAX_RANK}")));
            }
            if !(lora.alpha.is_finite() && lora.alpha > 0.0) {
                return Err(problem("lora.alpha", "must be a positive number"));
            }
            if !(0.0..1.0).contains(&lora.dropout) {
                return Err(problem("lora.dropout", "must be in [0, 1)"));
            }
            check_names(&lora.target_modules, &LORA_TARGETS, "lora.target_modules")?;
        }
        check_names(&self.modules_to_save, &SAVED_MODULES, "modules_to_save")?;
        if matches!(self.embedding_lr, Some(lr) if !(lr.is_finite() && lr > 0.0 && lr < 1.0)) {
            return Err(problem("embedding_lr", "must be in (0, 1)"));
        }
        if self.embedding_lr.is_some() && self.modules_to_save.is_empty() {
            return Err(problem("embedding_lr", "applies to modules_to_save, which is empty"));
        }
        if self.train_rows_from.is_some() && self.modules_to_save.is_empty() {
            return Err(problem("train_rows_from", "applies to modules_to_save, which is empty"));
        }
        if matches!(&self.init_from, Some(path) if path.trim().is_empty() || path.len() > 4096) {
            return Err(problem("init_from", "must name a directory (at most 4096 bytes)"));
        }
        Ok(())
    }

    /// Whether `module` (e.g. `q_proj`) carries a LoRA adapter.
    pub fn adapts(&self, module: &str) -> bool {
        self.lora.as_ref().is_some_and(|l| l.target_modules.iter().any(|t| t == module))
    }

    /// Whether `module` (`embed_tokens` or `lm_head`) is trained in full.
    pub fn saves(&self, module: &str) -> bool {
        self.modules_to_save.iter().any(|m| m == module)
    }

    /// Whether the input embedding is trained: saved itself, or, `tied` to the output layer, through it.
    pub fn trains_embedding(&self, tied: bool) -> bool {
        self.saves("embed_tokens") || (tied && self.saves("lm_head"))
    }

    /// Whether the output layer is trained: saved itself, or, `tied` to the embedding, through it.
    pub fn trains_output(&self, tied: bool) -> bool {
        self.saves("lm_head") || (tied && self.saves("embed_tokens"))
    }
}

fn check_names(names: &[String], allowed: &[&str], field: &str) -> Result<(), FieldError> {
    for (i, name) in names.iter().enumerate() {
        if !allowed.contains(&name.as_str()) {
            return Err(problem(&format!("{field}[{i}]"), format!("{name:?} is not one of {allowed:?}")));
        }
        if names[..i].contains(name) {
            return Err(problem(&format!("{field}[{i}]"), format!("{name:?} is listed twice")));
        }
    }
    if field.ends_with("target_modules") && names.is_empty() {
        return Err(problem(field, "needs at least one module"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lora(rank: usize, targets: &[&str]) -> AdapterSpec {
        AdapterSpec {
            lora: Some(LoraSpec {
                rank,
                alpha: 16.0,
                dropout: 0.0,
                target_modules: targets.iter().map(|t| t.to_string()).collect(),
                rslora: false,
            }),
            modules_to_save: vec![],
            embedding_lr: None,
            base_dtype: BaseDtype::Bf16,
            init_from: None,
            train_rows_from: None,
        }
    }

    #[test]
    fn bad_adapters_name_their_field() {
        let field = |a: AdapterSpec| a.validate().unwrap_err().field;
        assert_eq!(field(lora(0, &["q_proj"])), "adapter.lora.rank");
        assert_eq!(field(lora(8, &["q_proj", "wq"])), "adapter.lora.target_modules[1]");
        assert_eq!(field(lora(8, &["q_proj", "q_proj"])), "adapter.lora.target_modules[1]");
        assert_eq!(field(lora(8, &[])), "adapter.lora.target_modules");
        let mut embeddings_lr_alone = lora(8, &["q_proj"]);
        embeddings_lr_alone.embedding_lr = Some(1e-5);
        assert_eq!(field(embeddings_lr_alone), "adapter.embedding_lr");
        let mut nothing = lora(8, &["q_proj"]);
        nothing.lora = None;
        assert_eq!(field(nothing), "adapter.lora");
        assert!(lora(8, &["q_proj", "down_proj"]).validate().is_ok());
    }

    #[test]
    fn scaling_follows_peft() {
        let mut spec = lora(16, &["q_proj"]).lora.unwrap();
        assert_eq!(spec.scale(), 1.0);
        spec.rslora = true;
        assert_eq!(spec.scale(), 4.0);
    }
}
