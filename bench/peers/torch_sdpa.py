#!/usr/bin/env python3
"""Peer benchmark: PyTorch's scaled_dot_product_attention on the same sizes as `randattn bench`.

Not part of CI. Run it in an environment where torch is importable, e.g.
    python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch numpy
    /tmp/torchenv/bin/python bench/peers/torch_sdpa.py --n 1024,4096 --backward
Prints the same table columns as `randattn bench` (median ms), and JSON with --json.
"""
import argparse
import json
import statistics
import sys
import time

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    print("torch is not importable here; nothing to compare", file=sys.stderr)
    sys.exit(0)


def median_ms(fn, repeats, budget_s=2.0):
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start < budget_s and len(times) < 50):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", default="512,1024,4096")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--backward", action="store_true")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json")
    a = p.parse_args()
    torch.manual_seed(0)
    rows, results = [], []
    for n in [int(x) for x in a.n.split(",")]:
        shape = (a.batch, a.heads, n, a.d)
        q, k, v = (torch.randn(shape, requires_grad=a.backward) for _ in range(3))

        def fwd():
            with torch.no_grad():
                return F.scaled_dot_product_attention(q, k, v)

        f_ms = median_ms(fwd, a.repeats)
        b_ms = None
        if a.backward:
            g = torch.ones(shape)

            def both():
                out = F.scaled_dot_product_attention(q, k, v)
                out.backward(g)
                q.grad = k.grad = v.grad = None

            b_ms = max(median_ms(both, a.repeats) - f_ms, 0.0)
        rows.append((n, f_ms, b_ms))
        results.append({"method": "torch-sdpa", "params": {}, "batch": a.batch, "heads": a.heads,
                        "n": n, "d": a.d, "forward_ms": f_ms, "backward_ms": b_ms,
                        "speedup_vs_exact": None, "peak_extra_bytes": None})
    print(f"torch {torch.__version__} threads={torch.get_num_threads()} batch={a.batch} heads={a.heads} d={a.d}")
    print(f"{'method':<11} {'n':>6} {'fwd ms':>9} {'bwd ms':>9} {'fwd+bwd ms':>11}")
    for n, f_ms, b_ms in rows:
        b = f"{b_ms:9.1f}" if b_ms is not None else f"{'-':>9}"
        fb = f"{f_ms + b_ms:11.1f}" if b_ms is not None else f"{'-':>11}"
        print(f"{'torch-sdpa':<11} {n:>6} {f_ms:9.1f} {b} {fb}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
