"""`cpt-worker extend-vocab` against transformers: the extended model and tokenizer load, no existing
token id or logit changes, each new row is the mean of its pieces' rows under the old tokenizer,
and Chinese text needs fewer tokens.
"""

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from test_hf_parity import ASSETS, ROOT, TEXTS, worker, imported  # noqa: F401  (session fixture)


def test_extended_vocabulary_keeps_old_ids_and_logits_and_starts_new_rows_at_their_pieces_mean(imported, tmp_path):  # noqa: F811
    out = tmp_path / "extended"
    poems = tmp_path / "poems.txt"
    texts = [json.loads(line)["text"] for line in (ASSETS / "text/tang-poems.jsonl").open()]
    poems.write_text("\n\n".join(texts))
    sample = tmp_path / "sample.txt"
    sample.write_text("\n\n".join(texts[:50]))
    report = json.loads(worker(
        "extend-vocab", "--model", imported, "--corpus", poems, ROOT / "tests/fixtures/chinese-docs.txt",
        "--new-tokens", 300, "--report-text", sample, ROOT / "tests/fixtures/chinese-docs.txt",
        ROOT / "tests/fixtures/english.txt", "--out", out,
    ))
    assert report["added_tokens"] == 300 and report["vocab_size"] == report["base_vocab_size"] + 300
    poetry, docs, english = report["fertility"]
    assert poetry["after"] < 0.8 * poetry["before"], poetry
    assert docs["after"] < docs["before"], docs
    assert english["after"] == english["before"], "English text is tokenized as before"

    old_tokenizer = AutoTokenizer.from_pretrained(str(imported))
    new_tokenizer = AutoTokenizer.from_pretrained(str(out))
    old_vocab = old_tokenizer.get_vocab()
    new_vocab = new_tokenizer.get_vocab()
    assert all(new_vocab[token] == i for token, i in old_vocab.items()), "no existing id changes"
    for name in ("english", "digits_and_code", "special_tokens"):
        assert new_tokenizer(TEXTS[name])["input_ids"] == old_tokenizer(TEXTS[name])["input_ids"], name
    assert len(new_tokenizer(TEXTS["chinese"])["input_ids"]) < len(old_tokenizer(TEXTS["chinese"])["input_ids"])

    old = AutoModelForCausalLM.from_pretrained(str(imported), dtype=torch.float32)
    new = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    ids = old_tokenizer(TEXTS["english"], return_tensors="pt")["input_ids"][:, :128]
    with torch.no_grad():
        before, after = old(input_ids=ids).logits, new(input_ids=ids).logits
    base_size = report["base_vocab_size"]
    assert after.shape[-1] == base_size + 300
    assert torch.allclose(after[..., :base_size], before, rtol=1e-5, atol=1e-5), "old tokens' logits are unchanged"

    table = new.get_input_embeddings().weight
    old_table = old.get_input_embeddings().weight
    added = sorted(i for token, i in new_vocab.items() if token not in old_vocab)
    assert len(added) == 300
    for i in added[::37]:
        pieces = old_tokenizer(new_tokenizer.decode([i]), add_special_tokens=False)["input_ids"]
        assert len(pieces) >= 1
        assert torch.allclose(table[i], old_table[pieces].mean(0), atol=1e-6), (i, new_tokenizer.decode([i]), pieces)
