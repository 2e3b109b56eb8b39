#!/usr/bin/env python3
"""Peer benchmark: the attentions of pkuzengqi/Skeinformer (the Skeinformer paper's code) on a CPU.

Times one method's attention (no Q/K/V projections) forward and forward + backward, with the
protocol of `peer_timing.py`. The peer's code is imported from the clone you point at; nothing of
it is in this repository. Not part of CI.

    git clone https://github.com/pkuzengqi/Skeinformer /tmp/peers/Skeinformer
    python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch numpy
    /tmp/torchenv/bin/python bench/peers/skeinformer_repo.py --repo /tmp/peers/Skeinformer \
        --method skeinformer --n 4096

Methods and budgets (the LRA configuration of the repository's `src/config.py`, budgets as in
our defaults): `skeinformer` (`nb_features` = budget, default 256; `kernel_RS_SM`, accumulation 1,
sampling factor 4), `nystrom` (`num_landmarks`, 64), `linformer` (`linformer_k`, 256; E is held
fixed, without a gradient, as our Linformer's seeded projections are), `informer` (factor c = 5,
our default; its constructor derives c from `in_nb_features`, so c is set on the instance),
`softmax` (the repository's own softmax attention). The mask is all ones.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_timing  # noqa: E402

BUDGETS = {"skeinformer": 256, "nystrom": 64, "linformer": 256, "informer": 5, "softmax": None}


def build(a, budget):
    from models.attention import attn_selector

    config = {
        "device": "cpu",
        "max_seq_len": a.n,
        "head_dim": a.d,
        "num_head": a.heads,
        "attention_dropout": 0.0,
        "sketched_kernel": "kernel_RS_SM",
        "accumulation": 1,
        "sampling_factor": 4,
        "no_projection": False,
        "nb_features": budget,
        "linformer_k": budget,
        "num_landmarks": budget,
        "in_nb_features": 1,
    }
    module = attn_selector(a.method, config)
    if a.method == "informer":
        module.factor = budget
    if a.method == "linformer":
        module.E.requires_grad_(False)
    module.eval()
    return module


def main():
    p = peer_timing.base_parser(__doc__.splitlines()[1], sorted(BUDGETS))
    a = p.parse_args()
    peer_timing.require_torch()
    import torch

    peer_timing.import_repo(p, a.repo, "pkuzengqi/Skeinformer", "src", "models")
    budget = a.budget if a.budget is not None else BUDGETS[a.method]
    if a.method == "nystrom" and a.n % budget:
        p.error(f"the peer's Nystrom needs n divisible by the landmarks ({a.n} % {budget})")
    module = build(a, budget)
    mask = torch.ones(a.batch, a.n)
    q, k, v, grad = peer_timing.inputs(a)
    label = {"softmax": "exact"}.get(a.method, a.method)
    peer_timing.measure(a, "pkuzengqi/Skeinformer", label, budget,
                        lambda q, k, v: module(q, k, v, mask), q, k, v, grad)


if __name__ == "__main__":
    main()
