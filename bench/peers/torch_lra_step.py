#!/usr/bin/env python3
"""Peer benchmark: PyTorch's training step of the LRA model, for `randattn-train`'s step_time.

The model of the PyTorch LRA harness (brief lra-glue-data.md §1.3) as `randattn train` builds it:
token + learned position embeddings, 2 pre-LN blocks (width 64, 2 heads of 32, FFN 128, GELU,
dropout 0.1), final LayerNorm, mean pooling, Linear-ReLU-Linear head; attention by
`scaled_dot_product_attention` (softmax); AdamW (betas 0.9/0.999, eps 1e-6). One step =
forward, cross-entropy, backward, optimiser update, on random tokens, batch 32.

Not part of CI. Run it where torch is importable, e.g.
    python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch numpy
    /tmp/torchenv/bin/python bench/peers/torch_lra_step.py --n 512,1024,2048
and compare with
    cargo run --release -p randattn-train --example step_time -- 512,1024,2048 exact
Prints median ms per step (after warm-up), and JSON with --json.
"""
import argparse
import json
import statistics
import sys
import time

try:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
except ImportError:
    print("torch is not importable here; nothing to compare", file=sys.stderr)
    sys.exit(0)


class Block(nn.Module):
    def __init__(self, width, heads, ffn, dropout):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.ff1 = nn.Linear(width, ffn)
        self.ff2 = nn.Linear(ffn, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, mask):
        b, n, w = x.shape
        h = self.ln1(x)
        q, k, v = self.qkv(h).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        a = self.out(a.transpose(1, 2).reshape(b, n, w))
        x = x + self.drop(a)
        f = self.ff2(self.drop(F.gelu(self.ff1(self.ln2(x)))))
        return x + self.drop(f)


class Model(nn.Module):
    def __init__(self, vocab, n, classes, width=64, heads=2, ffn=128, hidden=128, layers=2, dropout=0.1):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.randn(n, width) * 0.02)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(width, heads, ffn, dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, tokens):
        mask = tokens != 0
        x = self.drop(self.embed(tokens) + self.pos[: tokens.shape[1]])
        for blk in self.blocks:
            x = blk(x, mask)
        x = self.ln(x) * mask[..., None]
        return self.head(x.mean(1))


def step_ms(n, batch, repeats):
    torch.manual_seed(0)
    model = Model(256, n, 10)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0)
    tokens = torch.randint(1, 256, (batch, n))
    labels = torch.full((batch,), 3)

    def one():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(tokens), labels)
        loss.backward()
        opt.step()

    one()
    one()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        one()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", default="512,1024,2048")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    rows = []
    for n in [int(x) for x in a.n.split(",")]:
        rows.append({"n": n, "batch": a.batch, "step_ms": step_ms(n, a.batch, a.repeats)})
    if a.json:
        print(json.dumps({"torch": torch.__version__, "threads": a.threads, "results": rows}))
    else:
        print(f"torch {torch.__version__}, {a.threads} threads, batch {a.batch}: LRA model training step")
        for r in rows:
            print(f"n={r['n']:5}  {r['step_ms']:8.1f} ms")


if __name__ == "__main__":
    main()
