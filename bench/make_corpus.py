"""Writes a JSONL corpus of at least SIZE_MB megabytes from the real texts in ASSETS/text by
repeating them with perturbations: each pass shuffles the words of every line (Brown) or the
lines of every poem (Tang) with its own seed, so passes are not exact duplicates. The Brown passes
are not near duplicates either; the Tang passes are (the same lines in another order share their
character shingles), which is why bench/prepare.sh turns deduplication off.

usage: make_corpus.py ASSETS OUT.jsonl SIZE_MB
"""

import json
import random
import sys

assets, out, size_mb = sys.argv[1], sys.argv[2], float(sys.argv[3])
docs = [json.loads(line)["text"] for name in ("brown.jsonl", "tang-poems.jsonl") for line in open(f"{assets}/text/{name}")]
target = size_mb * 1e6
written = 0
with open(out, "w") as dst:
    passes = 0
    while written < target:
        rng = random.Random(passes)
        for doc in docs:
            if passes:
                lines = doc.split("\n")
                if all(" " in line for line in lines[:3]):
                    for i, line in enumerate(lines):
                        words = line.split(" ")
                        rng.shuffle(words)
                        lines[i] = " ".join(words)
                else:
                    head, body = lines[0], lines[1:]
                    rng.shuffle(body)
                    lines = [f"{head} {passes}", *body]
                doc = "\n".join(lines)
            record = json.dumps({"text": doc}, ensure_ascii=False) + "\n"
            dst.write(record)
            written += len(record.encode())
        passes += 1
print(f"{out}: {written / 1e6:.0f} MB in {passes} passes")
