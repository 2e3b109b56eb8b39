#!/usr/bin/env python3
"""Peer benchmark: the attentions of HKUNLP/efficient-attention (the LARA paper's code) on a CPU.

Times one method's attention core (no Q/K/V or output projections) forward and forward +
backward, with the protocol of `peer_timing.py`. The peer's code is imported from the clone you
point at; nothing of it is in this repository. Not part of CI.

    git clone https://github.com/HKUNLP/efficient-attention /tmp/peers/efficient-attention
    python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch numpy einops
    /tmp/torchenv/bin/python bench/peers/efficient_attention_repo.py \
        --repo /tmp/peers/efficient-attention --method lara --n 4096

Methods and budgets (the repository's argument defaults where they are the papers' settings):
`lara` (`LinearRA`, `num_landmarks` = budget, default 64, `proposal_gen="adaptive-1d"`,
`mis-opt`; its small landmark Linear + LayerNorm stays in, with gradients off, as our LARA has no
such layers), `performer` (`KernelizedAttention`, `approx_attn_dim` = budget, default 256,
`favorp`), `ra` (`RandomizedAttention`, `num_samples` = budget, default 1). Modules are in
training mode, so every call draws new samples, as ours do with a new seed. `timm`, used by the
repository only for `trunc_normal_`, is replaced by torch's when it is not installed.
"""
import os
import sys
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_timing  # noqa: E402

BUDGETS = {"lara": 64, "performer": 256, "ra": 1}


def stub_timm():
    """`timm.models.layers.trunc_normal_` from torch, unless timm is installed."""
    try:
        import timm.models.layers  # noqa: F401
    except ImportError:
        import torch

        layers = types.ModuleType("timm.models.layers")
        layers.trunc_normal_ = torch.nn.init.trunc_normal_
        models = types.ModuleType("timm.models")
        models.layers = layers
        timm = types.ModuleType("timm")
        timm.models = models
        sys.modules.update({"timm": timm, "timm.models": models, "timm.models.layers": layers})


def build(a, budget):
    import torch
    from efficient_attention import AttentionFactory

    common = {"dim": a.heads * a.d, "num_heads": a.heads}
    if a.method == "lara":
        args = {"num_landmarks": budget, "proposal_gen": "adaptive-1d", "mis_type": "mis-opt"}
    elif a.method == "performer":
        args = {"approx_attn_dim": budget, "proj_method": "favorp"}
    else:
        args = {"num_samples": budget}
    module = AttentionFactory.build_attention(a.method, {**args, **common})
    for p in module.parameters():
        p.requires_grad_(False)
    module.train()
    if a.method != "lara":
        return lambda q, k, v: module._apply_attention(q, k, v, None)
    # LARA's attention is inlined in forward(x): feed it Q, K, V through proj_and_split_heads
    # and make the output projection the identity; x only carries the shape.
    held = {}
    module.proj_and_split_heads = lambda x: (held["q"], held["k"], held["v"])
    module.proj = torch.nn.Identity()
    x = torch.zeros(a.batch, a.n, a.heads * a.d)

    def call(q, k, v):
        held.update(q=q, k=k, v=v)
        return module(x)

    return call


def main():
    p = peer_timing.base_parser(__doc__.splitlines()[1], sorted(BUDGETS))
    a = p.parse_args()
    peer_timing.require_torch()
    peer_timing.import_repo(p, a.repo, "HKUNLP/efficient-attention", "efficient-attention",
                            "efficient_attention")
    stub_timm()
    budget = a.budget if a.budget is not None else BUDGETS[a.method]
    call = build(a, budget)
    q, k, v, grad = peer_timing.inputs(a)
    if a.method == "lara":
        # the module returns [batch, n, heads * d]
        grad = grad.transpose(1, 2).reshape(a.batch, a.n, a.heads * a.d)
    peer_timing.measure(a, "HKUNLP/efficient-attention", a.method, budget, call, q, k, v, grad)


if __name__ == "__main__":
    main()
