"""The PyTorch side of bench/train_speed.sh: the same model (transformers' LlamaForCausalLM, f32, eager
or scaled-dot-product attention), the same random tokens shape, AdamW settings and gradient clipping as `cpt-worker bench`, timed the
same way (median of the timed steps after warmup). Prints one JSON line."""

import argparse
import json
import resource
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

parser = argparse.ArgumentParser()
parser.add_argument("--config", required=True)
parser.add_argument("--seq-len", type=int, default=256)
parser.add_argument("--batch", type=int, default=8)
parser.add_argument("--steps", type=int, default=10)
parser.add_argument("--warmup", type=int, default=2)
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--attention", choices=["eager", "sdpa"], default="eager")
args = parser.parse_args()

torch.set_num_threads(args.threads)
torch.manual_seed(0)
config = LlamaConfig(**json.load(open(args.config)))
config._attn_implementation = args.attention
model = LlamaForCausalLM(config).float().train()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len + 1))
inputs, targets = ids[:, :-1], ids[:, 1:]

seconds, losses = [], []
for step in range(args.warmup + args.steps):
    started = time.perf_counter()
    logits = model(input_ids=inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, config.vocab_size), targets.reshape(-1))
    loss.backward()
    # As `cpt-worker bench` and a cpt job by default: the global norm clipped to 1.
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    losses.append(loss.item())
    if step >= args.warmup:
        seconds.append(time.perf_counter() - started)

step_seconds = statistics.median(seconds)
tokens = args.batch * args.seq_len
print(json.dumps({
    "attention": config._attn_implementation,
    "parameters": sum(p.numel() for p in model.parameters()),
    "tokens_per_step": tokens,
    "step_seconds": step_seconds,
    "tokens_per_second": tokens / step_seconds,
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "losses": losses,
}))
