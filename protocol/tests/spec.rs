//! Job spec parsing, validation and the resolved plan.

use cpt_protocol::plan::{self, flops_per_token, resolve_lr, StepPath, DEFAULT_BASE_LR};
use cpt_protocol::{JobSpec, ModelConfig, Plan};
use serde_json::{json, Value};

fn spec_json(extra: Value) -> String {
    let mut spec = json!({
        "name": "t", "base_model": "m", "train_data": [{"dataset": "d"}], "seq_len": 128, "max_steps": 100,
    });
    for (k, v) in extra.as_object().unwrap() {
        if v.is_null() {
            spec.as_object_mut().unwrap().remove(k);
        } else {
            spec[k] = v.clone();
        }
    }
    spec.to_string()
}

#[test]
fn defaults_fill_a_minimal_spec() {
    let spec = JobSpec::from_json_str(&spec_json(json!({}))).unwrap();
    assert_eq!((spec.micro_batch_size, spec.grad_accum_steps, spec.keep_checkpoints), (1, 1, 3));
    assert_eq!(spec.betas, [0.9, 0.95]);
    assert_eq!(spec.tokens_per_step(), 128);
}

#[test]
fn every_invalid_field_is_named() {
    let cases = [
        (json!({"seq_len": 0}), "seq_len"),
        (json!({"train_data": []}), "train_data"),
        (json!({"train_data": [{"dataset": "d", "weight": -1}]}), "train_data[0].weight"),
        (json!({"lr": 2.0}), "lr"),
        (json!({"lr": "fast"}), "lr"),
        (json!({"train_data": [{"dataset": 5}]}), "train_data[0].dataset"),
        (json!({"train_data": [{"weight": 1}]}), "train_data[0].dataset"),
        (json!({"warmup_steps": 5, "warmup_ratio": 0.1}), "warmup_ratio"),
        (json!({"recompute_every": 0}), "recompute_every"),
        (
            json!({"recompute_every": 1, "adapter": {"lora": {"rank": 4, "alpha": 8, "target_modules": ["q_proj"]}}}),
            "recompute_every",
        ),
        (json!({"max_steps": null}), "max_steps"),
        (json!({"max_tokens": 1000}), "max_tokens"),
        (json!({"betas": [0.9, 1.0]}), "betas[1]"),
        (json!({"grad_clip": 0}), "grad_clip"),
        (json!({"eval_data": {"bad name": "d"}}), "eval_data.bad name"),
        (json!({"spike_factor": 1.0}), "spike_factor"),
        (json!({"learning_rate": 1e-4}), "learning_rate"),
        (json!({"name": null}), "name"),
        (json!({"forgetting_budget": {"general": {"max_rise": 0.05}}}), "forgetting_budget.general"),
        (
            json!({"eval_data": {"general": "g"}, "forgetting_budget": {"general": {"max_rise": -1}}}),
            "forgetting_budget.general.max_rise",
        ),
        (
            json!({"eval_data": {"general": "g"}, "forgetting_budget": {"general": {"max_rise": 0.1, "action": "halt"}}}),
            "forgetting_budget.general.action",
        ),
        (json!({"spike_rollback": {"lr_scale": 0}}), "spike_rollback.lr_scale"),
        (json!({"spike_rollback": {"max_rollbacks": 0}}), "spike_rollback.max_rollbacks"),
    ];
    for (extra, field) in cases {
        let error =
            JobSpec::from_json_str(&spec_json(extra.clone())).err().unwrap_or_else(|| panic!("{extra} accepted"));
        assert_eq!(error.field, field, "{extra}: {error}");
    }
}

#[test]
fn auto_lr_is_a_tenth_of_the_pretraining_peak_scaled_by_the_root_batch_ratio() {
    // 4× the reference batch → 2× the rate.
    let spec = JobSpec::from_json_str(&spec_json(
        json!({"lr": "auto", "base_lr": 1e-3, "base_batch_tokens": 32, "micro_batch_size": 1}),
    ))
    .unwrap();
    let lr = resolve_lr(&spec);
    assert!((lr.peak - 0.1 * 1e-3 * 2.0).abs() < 1e-15, "{lr:?}");
    assert!((lr.min - lr.peak * 0.1).abs() < 1e-18);
    assert!(lr.reasoning.contains("given"), "{}", lr.reasoning);
    assert_eq!(lr.warning, None, "4× the batch is within the rule's range");
    let default = resolve_lr(&JobSpec::from_json_str(&spec_json(json!({}))).unwrap());
    assert!(default.reasoning.contains("default") && default.peak < 0.1 * DEFAULT_BASE_LR);
}

#[test]
fn auto_lr_far_from_the_pretraining_batch_says_so_and_a_given_lr_never_does() {
    // 2048 tokens a step against LLaMA's 4M: the rule gives ~6.6e-7.
    let small = JobSpec::from_json_str(&spec_json(json!({"lr": "auto", "seq_len": 2048}))).unwrap();
    let lr = resolve_lr(&small);
    assert!((lr.peak - 0.1 * DEFAULT_BASE_LR * (2048.0f64 / 4194304.0).sqrt()).abs() < 1e-15);
    let warning = lr.warning.expect("a warning");
    assert!(warning.contains("barely move") && warning.contains("6.63e-7"), "{warning}");
    let huge = json!({"lr": "auto", "base_batch_tokens": 16, "seq_len": 2048});
    assert!(resolve_lr(&JobSpec::from_json_str(&spec_json(huge)).unwrap()).warning.unwrap().contains("diverge"));
    let given = JobSpec::from_json_str(&spec_json(json!({"lr": 1e-4, "seq_len": 2048}))).unwrap();
    assert_eq!(resolve_lr(&given).warning, None);
    // At the limit itself the rule is trusted.
    let edge = json!({"lr": "auto", "base_batch_tokens": 64 * 128, "seq_len": 128});
    assert_eq!(resolve_lr(&JobSpec::from_json_str(&spec_json(edge)).unwrap()).warning, None);
}

#[test]
fn the_plan_counts_steps_tokens_warmup_and_flops() {
    let spec = JobSpec::from_json_str(&spec_json(json!({
        "max_steps": null, "max_tokens": 10_000, "micro_batch_size": 2, "grad_accum_steps": 4, "warmup_ratio": 0.1
    })))
    .unwrap();
    let config = ModelConfig::from_json(&json!({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "tie_word_embeddings": true,
    }))
    .unwrap();
    let plan = Plan::new(&spec, &config);
    assert_eq!((plan.tokens_per_step, plan.total_steps, plan.warmup_steps), (1024, 10, 1));
    // Hand count: per layer 4·64² attention + 3·64·128 MLP + 2·64 norms; final norm; lm_head 1000·64.
    let n = 2 * (4 * 64 * 64 + 3 * 64 * 128 + 2 * 64) + 64 + 1000 * 64;
    assert_eq!(config.non_embedding_parameters(), n);
    assert_eq!(plan.parameters, n as u64, "tied: the embedding is the lm_head");
    assert_eq!(flops_per_token(&config, 128), 6.0 * n as f64 + 12.0 * (2 * 4 * 16 * 128) as f64);
    assert_eq!(plan.total_flops, plan.flops_per_token * 10240.0);
    assert!(plan.memory_estimate_bytes > 16 * n as u64);
}

#[test]
fn recomputation_estimates_layer_inputs_and_one_segment() {
    let config = ModelConfig::from_json(&json!({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 8, "num_attention_heads": 4, "tie_word_embeddings": true,
    }))
    .unwrap();
    let estimate = |recompute: Value| {
        let spec = JobSpec::from_json_str(&spec_json(json!({"recompute_every": recompute, "seq_len": 512}))).unwrap();
        Plan::new(&spec, &config).memory_estimate_bytes as f64
    };
    let (every, every_4) = (estimate(json!(1)), estimate(json!(4)));
    assert!(every < every_4, "{every} < {every_4}");
    // Hand count per layer of the explicit step (f32): s·(5h + heads·d + 3i + (heads + 2·kv)·d)
    // kept, plus a log-sum-exp per query row and head; an input is s·h.
    let (s, h, i, heads, d) = (512.0, 64.0, 128.0, 4.0, 16.0);
    let layer = 4.0 * (s * (5.0 * h + heads * d + 3.0 * i + 3.0 * heads * d) + heads * s);
    let input = 4.0 * s * h;
    assert_eq!(every_4 - every, 3.0 * layer - 6.0 * input, "four layers and 2 inputs vs one layer and 8 inputs");
    // Without recomputation the explicit step keeps all 8 layers and no separate inputs; the plan
    // (any worker) reports the larger of the two paths.
    let spec = JobSpec::from_json_str(&spec_json(json!({"seq_len": 512}))).unwrap();
    let on = |path| plan::memory_estimate_bytes_on(&config, &spec, path) as f64;
    assert_eq!(on(StepPath::Explicit) - every, 7.0 * layer - 8.0 * input);
    let any_worker = Plan::new(&spec, &config).memory_estimate_bytes as f64;
    assert_eq!(any_worker, on(StepPath::Explicit).max(on(StepPath::Autograd)));
}

#[test]
fn only_full_f32_training_on_a_cpu_takes_the_explicit_step() {
    let spec = |change: Value| JobSpec::from_json_str(&spec_json(change)).unwrap();
    assert_eq!(StepPath::of(&spec(json!({})), true), StepPath::Explicit);
    assert_eq!(StepPath::of(&spec(json!({})), false), StepPath::Autograd);
    assert_eq!(StepPath::of(&spec(json!({"precision": "bf16"})), true), StepPath::Autograd);
    let lora = json!({"adapter": {"lora": {"rank": 4, "alpha": 8, "target_modules": ["q_proj"]}}});
    assert_eq!(StepPath::of(&spec(lora), true), StepPath::Autograd);
}

fn repo_file(path: &str) -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    std::fs::read_to_string(root.join(path)).unwrap()
}

#[test]
fn the_example_specs_are_valid() {
    for file in ["examples/tiny-cpu.json", "examples/smollm2-tang-poetry.json"] {
        JobSpec::from_json_str(&repo_file(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    }
}

#[test]
fn every_spec_field_is_documented_in_the_examples_readme() {
    let readme = repo_file("examples/README.md");
    let spec = JobSpec::from_json_str(&spec_json(json!({}))).unwrap();
    for field in serde_json::to_value(&spec).unwrap().as_object().unwrap().keys() {
        assert!(readme.contains(&format!("`{field}`")), "examples/README.md does not document `{field}`");
    }
}

#[test]
fn every_step_metric_is_documented_with_the_events() {
    let readme = repo_file("examples/README.md");
    let events = &readme[readme.find("## Events").expect("an events section")..];
    let step = cpt_protocol::StepMetrics {
        step: 1,
        loss: 0.0,
        lr: 0.0,
        grad_norm: 0.0,
        skipped: false,
        tokens: 0,
        tokens_total: 0,
        tokens_per_second: 0.0,
        flops: 0.0,
        flops_total: 0.0,
        flops_per_second: 0.0,
        mfu: 0.0,
        step_seconds: 0.0,
        data_seconds: 0.0,
        compute_seconds: 0.0,
    };
    for field in serde_json::to_value(cpt_protocol::Event::Step(step)).unwrap().as_object().unwrap().keys() {
        if field != "kind" {
            assert!(events.contains(&format!("`{field}`")), "the events table does not document `{field}`");
        }
    }
    let kinds = ["started", "step", "eval", "checkpoint", "sample", "warning", "finished", "prepared"];
    for kind in kinds.into_iter().chain(["forgetting_budget", "rollback", "vocabulary_extended"]) {
        assert!(events.contains(&format!("| `{kind}` |")), "the events table lacks `{kind}`");
    }
}

/// The lines of the schema `name` in openapi.yaml, up to the next schema, each after a newline.
fn openapi_schema(openapi: &str, name: &str) -> String {
    let header = format!("    {name}:");
    let mut lines = openapi.lines().skip_while(|line| *line != header);
    assert!(lines.next().is_some(), "openapi.yaml has no schema {name}");
    let is_next_schema = |line: &str| line.starts_with("    ") && !line.starts_with("     ");
    lines.take_while(|line| !is_next_schema(line)).map(|line| format!("\n{line}")).collect()
}

#[test]
fn every_spec_and_adapter_field_is_in_openapi_and_the_examples_readme() {
    let readme = repo_file("examples/README.md");
    let openapi = repo_file("openapi.yaml");
    let adapter = json!({
        "lora": {"rank": 4, "alpha": 8.0, "dropout": 0.1, "target_modules": ["q_proj"], "rslora": true},
        "modules_to_save": ["lm_head"], "embedding_lr": 1e-4, "base_dtype": "f16", "init_from": "x",
        "train_rows_from": 10,
    });
    let decoding = json!({"temperature": 0.7, "top_k": 40, "top_p": 0.9, "repetition_penalty": 1.2});
    let budget = json!({"general": {"max_rise": 0.05, "action": "pause"}});
    let rollback = json!({"lr_scale": 0.5, "cooldown_steps": 10, "max_rollbacks": 3});
    let extra = json!({ "adapter": adapter, "sample_decoding": decoding, "eval_data": {"general": "g"},
                        "forgetting_budget": budget, "spike_rollback": rollback });
    let spec = JobSpec::from_json_str(&spec_json(extra)).unwrap();
    let value = serde_json::to_value(&spec).unwrap();
    let schemas = [
        ("JobSpec", &value),
        ("ForgettingBudget", &value["forgetting_budget"]["general"]),
        ("SpikeRollback", &value["spike_rollback"]),
        ("AdapterSpec", &value["adapter"]),
        ("LoraSpec", &value["adapter"]["lora"]),
        ("SampleDecoding", &value["sample_decoding"]),
    ];
    for (schema, object) in schemas {
        let properties = openapi_schema(&openapi, schema);
        for field in object.as_object().unwrap().keys() {
            assert!(properties.contains(&format!("\n        {field}:")), "openapi.yaml's {schema} lacks `{field}`");
            assert!(readme.contains(&format!("`{field}`")), "examples/README.md does not document `{field}`");
        }
    }
}

#[test]
fn saved_modules_train_one_table_each_and_tied_embeddings_one_in_all() {
    for (tied, saved, tables) in [
        (false, vec!["embed_tokens"], 1),
        (false, vec!["lm_head"], 1),
        (false, vec!["embed_tokens", "lm_head"], 2),
        (true, vec!["embed_tokens"], 1),
        (true, vec!["lm_head"], 1),
        (true, vec!["embed_tokens", "lm_head"], 1),
    ] {
        let config = ModelConfig::from_json(&json!({
            "architectures": ["LlamaForCausalLM"], "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "tie_word_embeddings": tied,
        }))
        .unwrap();
        let spec = JobSpec::from_json_str(&spec_json(json!({"adapter": {"modules_to_save": saved}}))).unwrap();
        let plan = Plan::new(&spec, &config);
        assert_eq!(plan.trainable_parameters, tables * 1000 * 64, "tied {tied}, saved {saved:?}");
    }
}
