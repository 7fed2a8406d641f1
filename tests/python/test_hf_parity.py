"""cpt's model I/O against independent implementations: transformers' own GGUF loader, its
LLaMA forward pass, and AutoTokenizer. Drives the real `cpt-worker` binary.

Environment: CPT_WORKER (path of the binary; default target/release/cpt-worker under
CARGO_TARGET_DIR or the repository) and CPT_ASSETS (scripts/fetch-assets.sh's directory).
"""

import json
import os
import pathlib
import subprocess

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = pathlib.Path(__file__).resolve().parents[2]
ASSETS = pathlib.Path(os.environ.get("CPT_ASSETS", pathlib.Path.home() / ".cache/cpt/assets"))
GGUF = ASSETS / "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGET = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
WORKER = pathlib.Path(os.environ.get("CPT_WORKER", TARGET / "release/cpt-worker"))

TEXTS = {
    "english": (ROOT / "tests/fixtures/english.txt").read_text(),
    "chinese": "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "digits_and_code": "In 2024, 3.14159 * r**2 == area; print(f'{x:>10}')\n\n\ttabs  and  spaces",
    "special_tokens": "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
}


def worker(*args):
    result = subprocess.run([str(WORKER), *map(str, args)], capture_output=True, text=True)
    assert result.returncode == 0, f"cpt-worker {args} failed:\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="session")
def imported(tmp_path_factory):
    assert WORKER.exists(), f"{WORKER} is missing: cargo build --release"
    assert GGUF.exists(), f"{GGUF} is missing: run scripts/fetch-assets.sh"
    out = tmp_path_factory.mktemp("import") / "smollm2"
    worker("import", GGUF, "--out", out)
    return out


@pytest.fixture(scope="session")
def exported_f32(imported, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "f32"
    worker("export", imported, "--out", out, "--dtype", "f32")
    return out


def ours(model_dir, text, tmp_path, name):
    """Our tokenization and logits of `text` (one window)."""
    text_file = tmp_path / f"{name}.txt"
    text_file.write_text(text)
    dump = tmp_path / f"{name}.safetensors"
    worker("eval", "--model", model_dir, "--text", text_file, "--seq-len", 4096, "--save-logits", dump)
    return load_file(str(dump))


def test_import_is_bit_identical_to_transformers_own_gguf_loader(imported):
    reference = AutoModelForCausalLM.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name, dtype=torch.float32)
    reference = {k: v.numpy() for k, v in reference.state_dict().items()}
    weights = load_file(str(imported / "model.safetensors"))
    assert set(weights) == set(reference) - {"lm_head.weight"}  # tied to the embedding
    for name, tensor in weights.items():
        assert np.array_equal(tensor, reference[name]), name
    report = json.loads((imported / "cpt_import.json").read_text())
    assert report["quantized"] is True and report["tensor_types"]["Q4_1"] > 0


def test_exported_model_logits_match_transformers_in_f32(exported_f32, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(str(exported_f32), dtype=torch.float32)
    model.eval()
    for name in ("english", "chinese"):
        dump = ours(exported_f32, TEXTS[name], tmp_path, name)
        with torch.no_grad():
            reference = model(torch.from_numpy(dump["input_ids"]).unsqueeze(0)).logits[0].numpy()
        relative = np.abs(reference - dump["logits"]).max() / np.abs(reference).max()
        assert relative <= 1e-4, f"{name}: max relative logit error {relative:.2e}"


def test_autotokenizer_gives_our_token_ids(exported_f32, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(str(exported_f32))
    for name, text in TEXTS.items():
        dump = ours(exported_f32, text, tmp_path, name)
        assert tokenizer(text)["input_ids"] == dump["input_ids"].tolist(), name
        assert tokenizer.decode(dump["input_ids"].tolist()) == text, name


def test_bf16_export_loads_with_bf16_weights(imported, tmp_path):
    out = tmp_path / "bf16"
    worker("export", imported, "--out", out, "--dtype", "bf16")
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.dtype == torch.bfloat16
    original = load_file(str(imported / "model.safetensors"))
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        expected = torch.from_numpy(original[name]).to(torch.bfloat16)
        assert torch.equal(tensor, expected), name
