"""cpt's adapters against PyPI `peft`, the reference for adapters: the same LoRA and modules_to_save
give the same logits, a PEFT adapter merged by cpt gives them in plain transformers, three training
steps match PEFT + torch.optim.AdamW, and what cpt trains PeftModel.from_pretrained loads.
"""

import json
import math

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM

from test_hf_parity import ROOT, worker, imported  # noqa: F401  (session fixture)
from test_training_reference import english_dataset, tiny_base

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SAVED = ["embed_tokens", "lm_head"]
STEPS, PEAK, EMBEDDING_LR, WEIGHT_DECAY, CLIP, SEQ = 3, 2e-3, 5e-4, 0.1, 0.5, 32


def our_logits(model_dir, tmp_path, name):
    text = tmp_path / "text.txt"
    text.write_text((ROOT / "tests/fixtures/english.txt").read_text())
    dump = tmp_path / f"{name}.safetensors"
    worker("eval", "--model", model_dir, "--text", text, "--seq-len", 64, "--save-logits", dump)
    return load_file(str(dump))


def relative_error(ours, reference):
    return np.abs(ours - reference).max() / np.abs(reference).max()


def test_adapter_logits_match_peft_and_the_merged_export_matches_transformers(imported, tmp_path):  # noqa: F811
    base = tiny_base(tmp_path, imported, tied=False, seed=5)
    torch.manual_seed(0)
    # Random B as well as A, so the adapters are not a no-op; the saved modules perturbed likewise.
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, modules_to_save=SAVED, init_lora_weights=False)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.02)
    adapter = tmp_path / "adapter"
    model.save_pretrained(str(adapter))

    ours = our_logits(adapter, tmp_path, "adapter")
    ids = torch.from_numpy(ours["input_ids"]).unsqueeze(0)
    with torch.no_grad():
        reference = model(input_ids=ids).logits[0].numpy()
        plain = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)(input_ids=ids).logits[0].numpy()
    assert relative_error(plain, reference) > 1e-2, "the adapter must change the logits for this test to mean anything"
    assert relative_error(ours["logits"], reference) < 1e-4

    merged = tmp_path / "merged"
    worker("export", adapter, "--out", merged, "--dtype", "f32", "--merge")
    with torch.no_grad():
        merged_logits = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32)(input_ids=ids).logits[0]
    assert relative_error(merged_logits.numpy(), reference) < 1e-4


def train_export_and_load(tmp_path, imported, base, name, adapter):  # noqa: F811
    """Three steps of cpt with `adapter` over `base` at lr 1e-2, exported as a PEFT directory:
    (cpt's logits of its checkpoint, PEFT's model loaded from the export, the export's directory)."""
    spec = {
        "name": name, "base_model": str(base), "train_data": [{"dataset": str(english_dataset(tmp_path, imported, SEQ))}],
        "seq_len": SEQ, "micro_batch_size": 2, "lr": 1e-2, "max_steps": 3, "eval_every": 0, "checkpoint_every": 0,
        "adapter": adapter,
    }
    (tmp_path / f"{name}.json").write_text(json.dumps(spec))
    worker("train", "--spec", tmp_path / f"{name}.json", "--run-dir", tmp_path / name)
    checkpoint = tmp_path / f"{name}/checkpoints/step-3"
    exported = tmp_path / f"{name}-export"
    worker("export", checkpoint, "--out", exported, "--dtype", "f32")
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
                                       str(exported))
    return our_logits(checkpoint, tmp_path, name), loaded, exported


def test_a_tied_embedding_trained_by_cpt_is_the_one_peft_ties_the_output_to(imported, tmp_path):  # noqa: F811
    # SmolLM2's case: embed_tokens and lm_head are one tensor. cpt trains it as one and exports it as
    # embed_tokens with ensure_weight_tying, which PEFT must honour for the output layer too.
    base = tiny_base(tmp_path, imported, tied=True, seed=5)
    adapter = {"lora": {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
               "modules_to_save": ["embed_tokens"], "base_dtype": "f32"}
    mine, loaded, _ = train_export_and_load(tmp_path, imported, base, "tied", adapter)
    with torch.no_grad():
        theirs = loaded(input_ids=torch.from_numpy(mine["input_ids"]).unsqueeze(0)).logits[0].numpy()
        plain = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)(
            input_ids=torch.from_numpy(mine["input_ids"]).unsqueeze(0)).logits[0].numpy()
    assert relative_error(plain, theirs) > 1e-3, "three steps at lr 1e-2 must move the logits"
    assert relative_error(mine["logits"], theirs) < 1e-4


def test_three_adapter_steps_match_peft_with_torch_adamw_and_peft_loads_the_result(imported, tmp_path):  # noqa: F811
    base = tiny_base(tmp_path, imported, tied=False, seed=5)
    torch.manual_seed(1)
    # PEFT's own initialisation (A kaiming-uniform, B zero) is where both start.
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, modules_to_save=SAVED)
    start = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32), config)
    init = tmp_path / "init"
    start.save_pretrained(str(init))

    dataset = english_dataset(tmp_path, imported, SEQ)
    blocks = json.loads((dataset / "manifest.json").read_text())["splits"]["train"]["blocks"]
    spec = {
        "name": "peft-parity", "base_model": str(base), "train_data": [{"dataset": str(dataset)}],
        "seq_len": SEQ, "micro_batch_size": blocks, "grad_accum_steps": 2, "lr": PEAK, "schedule": "constant",
        "warmup_steps": 0, "max_steps": STEPS, "weight_decay": WEIGHT_DECAY, "betas": [0.9, 0.95], "eps": 1e-8,
        "grad_clip": CLIP, "eval_every": 0, "checkpoint_every": 0,
        "adapter": {
            "lora": {"rank": 4, "alpha": 8, "target_modules": TARGETS}, "modules_to_save": SAVED,
            "embedding_lr": EMBEDDING_LR, "base_dtype": "f32", "init_from": str(init),
        },
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    worker("train", "--spec", tmp_path / "spec.json", "--run-dir", tmp_path / "run")
    events = [json.loads(line) for line in (tmp_path / "run/events.jsonl").read_text().splitlines()]
    ours = [e for e in events if e["kind"] == "step"]

    tokens = np.fromfile(dataset / "train-00000.tokens", dtype="<u2").astype(np.int64).reshape(blocks, SEQ)
    batch = torch.from_numpy(tokens)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
                                      str(init), is_trainable=True)
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(trained) == 2 * 7 * 2 + 2
    saved = [p for n, p in trained if "modules_to_save" in n]
    lora = [p for n, p in trained if "modules_to_save" not in n]
    optimizer = torch.optim.AdamW(
        [{"params": lora, "lr": PEAK}, {"params": saved, "lr": EMBEDDING_LR}],
        betas=(0.9, 0.95), eps=1e-8, weight_decay=WEIGHT_DECAY,
    )
    for step in range(1, STEPS + 1):
        optimizer.zero_grad()
        losses = []
        for _ in range(2):
            loss = model(input_ids=batch, labels=batch).loss
            (loss / 2).backward()
            losses.append(loss.item())
        norm = math.sqrt(sum((p.grad.double() ** 2).sum().item() for _, p in trained))
        coefficient = CLIP / (norm + 1e-6)
        if coefficient < 1:
            for _, p in trained:
                p.grad.mul_(coefficient)
        optimizer.step()
        mine = ours[step - 1]
        assert math.isclose(mine["loss"], np.mean(losses), rel_tol=2e-5), (step, mine["loss"], losses)
        assert math.isclose(mine["grad_norm"], norm, rel_tol=1e-5), (step, mine["grad_norm"], norm)

    checkpoint = tmp_path / f"run/checkpoints/step-{STEPS}"
    final = load_file(str(checkpoint / "adapter_model.safetensors"))
    reference = {k: v.detach().numpy() for k, v in get_peft_model_state_dict(model).items()}
    assert final.keys() == reference.keys()
    for name, tensor in final.items():
        error = np.linalg.norm(tensor - reference[name]) / np.linalg.norm(reference[name])
        assert error < 5e-5, f"{name}: relative error {error:.2e}"

    # What cpt exports, PEFT loads onto the base, and it computes what cpt computes.
    exported = tmp_path / "exported"
    worker("export", checkpoint, "--out", exported, "--dtype", "f32")
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
                                       str(exported))
    mine = our_logits(checkpoint, tmp_path, "trained")
    with torch.no_grad():
        theirs = loaded(input_ids=torch.from_numpy(mine["input_ids"]).unsqueeze(0)).logits[0].numpy()
    assert relative_error(mine["logits"], theirs) < 1e-4


@pytest.mark.parametrize("tied,lora", [(False, False), (True, False), (False, True), (True, True)])
def test_peft_loads_new_rows_trained_alone_or_beside_lora_and_only_those_rows_moved(imported, tmp_path, tied, lora):  # noqa: F811
    # Stage 1 of the new-language recipe trains only the rows from `train_rows_from` on of
    # embed_tokens and lm_head, with no LoRA at all (which PEFT's LoraConfig refuses): PEFT stores
    # that as trainable tokens, alone or beside LoRA. cpt's export must load and mean the same.
    base = tiny_base(tmp_path, imported, tied=tied, seed=6)
    first_new = 49000
    adapter = {"modules_to_save": SAVED, "train_rows_from": first_new, "base_dtype": "f32"}
    if lora:
        adapter["lora"] = {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    mine, loaded, exported = train_export_and_load(tmp_path, imported, base, "rows", adapter)
    plain = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    ids = torch.from_numpy(mine["input_ids"]).unsqueeze(0)
    with torch.no_grad():
        theirs = loaded(input_ids=ids).logits[0].numpy()
        merged = loaded.merge_and_unload()
    assert relative_error(mine["logits"], theirs) < 1e-4
    stored = load_file(str(exported / "adapter_model.safetensors"))
    rows = {name: t.shape[0] for name, t in stored.items() if "trainable_tokens_delta" in name}
    assert rows and set(rows.values()) == {49152 - first_new}, rows
    assert all(t.shape[0] != 49152 for t in stored.values()), "only the new rows are stored"
    for table in ("get_output_embeddings", "get_input_embeddings"):
        before, after = getattr(plain, table)().weight, getattr(merged, table)().weight
        assert torch.equal(after[:first_new], before[:first_new]), f"{table}: rows below train_rows_from are the base's"
    out_before, out_after = plain.get_output_embeddings().weight, merged.get_output_embeddings().weight
    assert (out_after[first_new:] - out_before[first_new:]).abs().max() > 1e-3, "the new rows were trained"
