"""The Python reference for the preparation benchmark: HF `tokenizers` (Rust inside, batched and
parallel) tokenizes every document, then numpy packs documents joined with EOS into uint16 blocks
of SEQ_LEN tokens written to OUT. No cleaning or dedup: this is the floor a Python pipeline pays.

usage: prepare_reference.py TOKENIZER_JSON CORPUS.jsonl OUT SEQ_LEN
"""

import json
import sys
import time

import numpy as np
from tokenizers import Tokenizer

tokenizer_path, corpus, out, seq_len = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
tokenizer = Tokenizer.from_file(tokenizer_path)
eos = tokenizer.token_to_id("<|endoftext|>")
start = time.time()
pending = np.zeros(0, dtype=np.uint16)
read = 0
with open(corpus, "rb") as src, open(out, "wb") as dst:
    while True:
        lines = src.readlines(1 << 24)
        if not lines:
            break
        read += sum(map(len, lines))
        texts = [json.loads(line)["text"] for line in lines]
        ids = [np.array(e.ids + [eos], dtype=np.uint16) for e in tokenizer.encode_batch(texts)]
        pending = np.concatenate([pending, *ids])
        full = len(pending) // seq_len * seq_len
        pending[:full].tofile(dst)
        pending = pending[full:]
seconds = time.time() - start
print(json.dumps({"reference_seconds": seconds, "reference_mb_per_s": read / 1e6 / seconds}))
