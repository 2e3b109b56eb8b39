#!/usr/bin/env python3
"""Peer benchmark: Hugging Face transformers' YOSO-E (`use_expectation=True`) on a CPU.

Times the attention core of `YosoSelfAttention` as the model runs it — Q and K L2-normalised,
`YosoCumulation` (B = (1 - arccos(QKᵀ)/π)^τ, B V, and its τ/2 surrogate backward), the output
L2-normalised — without the Q/K/V projections, with the protocol of `peer_timing.py`. This is
what our `yoso-e` computes (its default `normalize=true`, `backward=surrogate-exact-b`). The
sampled LSH mode (`use_expectation=False`) needs the CUDA kernels and does not run on a CPU.
Not part of CI.

    python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch numpy transformers
    /tmp/torchenv/bin/python bench/peers/transformers_yoso.py --method yoso-e --n 4096

`--repo` may point at a clone of huggingface/transformers (its `src/` is imported) instead of the
installed package. The budget is the hash code length τ (default 12).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_timing  # noqa: E402


def main():
    p = peer_timing.base_parser(__doc__.splitlines()[1], ["yoso-e"])
    a = p.parse_args()
    peer_timing.require_torch()
    import torch

    if a.repo:
        src = os.path.join(a.repo, "src")
        if not os.path.isdir(os.path.join(src, "transformers")):
            p.error(f"--repo: {src}/transformers not found")
        sys.path.insert(0, src)
    try:
        from transformers.models.yoso.modeling_yoso import YosoCumulation, normalize
    except ImportError as e:
        p.error(f"transformers' YOSO is not importable ({e}); pip install transformers or pass --repo")
    tau = a.budget if a.budget is not None else 12
    config = {"hash_code_len": tau, "use_fast_hash": True, "num_hash": 32, "lsh_backward": True}
    bh = a.batch * a.heads
    mask = torch.ones(bh, a.n, dtype=torch.int32)

    def call(q, k, v):
        q2, k2 = normalize([q.reshape(bh, a.n, a.d), k.reshape(bh, a.n, a.d)])
        out = YosoCumulation.apply(mask, mask, q2, k2, v.reshape(bh, a.n, a.d), config)
        return normalize(out).reshape(a.batch, a.heads, a.n, a.d)

    q, k, v, grad = peer_timing.inputs(a)
    peer_timing.measure(a, "huggingface/transformers", "yoso-e", tau, call, q, k, v, grad)


if __name__ == "__main__":
    main()
