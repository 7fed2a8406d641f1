"""`cpt-worker prepare` against an independent pipeline in Python (HF `tokenizers` from PyPI): the
manifest's token counts and the packed training blocks equal a fresh tokenization of the kept
documents, split and packed by the documented rules."""

import hashlib
import json
import os
import pathlib
import unicodedata

import numpy as np
from tokenizers import Tokenizer

from test_hf_parity import ASSETS, worker, imported  # noqa: F401  (session fixture)

MASK = (1 << 64) - 1


def splitmix64(x):
    x = (x + 0x9E3779B97F4A7C15) & MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def is_validation(text, fraction):
    """The documented split rule: SplitMix64 of the first 8 bytes (little-endian) of sha256(text)."""
    h = splitmix64(int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little"))
    return (h >> 11) / (1 << 53) < fraction


def test_manifest_counts_and_blocks_equal_an_independent_tokenization(imported, tmp_path):  # noqa: F811
    docs = [json.loads(line)["text"] for line in open(ASSETS / "text/brown.jsonl")][:80]
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    config = tmp_path / "prepare.json"
    # Line rules off (they would drop a few of Brown's "--" lines); document rules and dedup stay on.
    line_rules_off = {"boilerplate_patterns": [], "max_url_line_ratio": 1.0, "max_symbol_line_ratio": 1.0}
    config.write_text(json.dumps({"validation_fraction": 0.1, "seq_len": 128, "clean": line_rules_off}))
    out = tmp_path / "dataset"
    worker("prepare", "--tokenizer", imported / "tokenizer.json", "--input", source, "--out", out, "--config", config)
    manifest = json.loads((out / "manifest.json").read_text())
    report = manifest["stats"]
    assert report["documents_kept"] == report["documents_read"] == len(docs), report
    assert report["line_rules"] == {}, report["line_rules"]

    # The kept text as cleaning leaves clean prose: NFC, trailing spaces trimmed per line, stripped.
    kept = ["\n".join(line.rstrip() for line in unicodedata.normalize("NFC", d).splitlines()).strip() for d in docs]
    tokenizer = Tokenizer.from_file(str(imported / "tokenizer.json"))
    eos = tokenizer.token_to_id("<|endoftext|>")
    streams = {"train": [], "validation": []}
    for text in kept:
        split = "validation" if is_validation(text, 0.1) else "train"
        streams[split] += tokenizer.encode(text).ids + [eos]
    for split, stream in streams.items():
        info = manifest["splits"][split]
        assert info["tokens"] == len(stream), split
        assert info["blocks"] == len(stream) // 128, split
        shard = np.fromfile(out / f"{split}-00000.tokens", dtype="<u2") if info["blocks"] else np.array([])
        assert shard.tolist() == stream[: info["blocks"] * 128], split
        digest = hashlib.sha256(shard.astype("<u2").tobytes()).hexdigest()
        assert not info["shards"] or info["shards"][0]["sha256"] == digest
    assert manifest["tokenizer_sha256"] == hashlib.sha256((imported / "tokenizer.json").read_bytes()).hexdigest()
