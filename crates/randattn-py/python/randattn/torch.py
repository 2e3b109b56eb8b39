"""randattn in PyTorch: an autograd function and an ``nn.Module`` over the library's kernels.

CPU float32 tensors go to the kernels without a copy (through numpy, which shares their memory);
CUDA tensors and other dtypes are a clear error. Gradients flow to q, k and v with the forward's
samples held fixed (the backward reuses them), so a randomized attention trains like any layer.

    >>> import torch, randattn.torch as rt
    >>> q = torch.randn(1, 2, 64, 16, requires_grad=True)
    >>> out = rt.attention(q, q, q, "performer", features=32, seed=7)
    >>> out.sum().backward()
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

import randattn

__all__ = ["Attention", "attention", "projected_attention"]


def _array(t: Any, name: str) -> np.ndarray:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(
            f"{name} is on {t.device}; randattn's kernels run on the CPU (move it with .cpu())"
        )
    if t.dtype != torch.float32:
        raise TypeError(f"{name} must be torch.float32, got {t.dtype} (convert with .float())")
    return t.detach().numpy()


def _mask(m: Any, name: str) -> Any:
    if isinstance(m, torch.Tensor):
        if m.device.type != "cpu":
            m = m.cpu()
        return m.numpy()
    return m


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, method, key_mask, query_mask, seed, layout, params):  # type: ignore[override]
        out, saved = randattn.forward(
            _array(q, "q"),
            _array(k, "k"),
            _array(v, "v"),
            method,
            key_mask=_mask(key_mask, "key_mask"),
            query_mask=_mask(query_mask, "query_mask"),
            seed=seed,
            layout=layout,
            **params,
        )
        ctx.saved_state = saved
        return torch.from_numpy(out)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        g = grad_out.detach()
        if g.dtype != torch.float32:
            g = g.float()
        dq, dk, dv = randattn.backward(ctx.saved_state, g.cpu().numpy())
        return (torch.from_numpy(dq), torch.from_numpy(dk), torch.from_numpy(dv),
                None, None, None, None, None, None)


class _ProjectedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, x, wv, bv, method, key_mask, query_mask, seed, layout, params):  # type: ignore[override]
        out, saved = randattn.forward_projected(
            _array(q, "q"),
            _array(k, "k"),
            _array(x, "x"),
            _array(wv, "wv"),
            None if bv is None else _array(bv, "bv"),
            method,
            key_mask=_mask(key_mask, "key_mask"),
            query_mask=_mask(query_mask, "query_mask"),
            seed=seed,
            layout=layout,
            **params,
        )
        ctx.saved_state = saved
        return torch.from_numpy(out)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        g = grad_out.detach().float().cpu().numpy()
        dq, dk, dx, dwv, dbv = randattn.backward_projected(ctx.saved_state, g)
        t = lambda a: None if a is None else torch.from_numpy(a)
        return (t(dq), t(dk), t(dx), t(dwv), t(dbv), None, None, None, None, None, None)


def projected_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    x: torch.Tensor,
    wv: torch.Tensor,
    bv: torch.Tensor | None = None,
    method: str = "mca",
    *,
    key_mask: Any = None,
    query_mask: Any = None,
    seed: int = 0,
    layout: str = "bhnd",
    **params: Any,
) -> torch.Tensor:
    """Attention of a method that samples the value projection (MCA), differentiable w.r.t.
    ``q``, ``k``, the layer input ``x`` ``[batch, n, d_model]``, ``wv`` ``[d_model, heads·d_v]``
    and ``bv`` ``[heads·d_v]`` (see :func:`randattn.forward_projected`)."""
    return _ProjectedAttention.apply(q, k, x, wv, bv, method, key_mask, query_mask, seed, layout,
                                     params)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    method: str = "exact",
    *,
    key_mask: Any = None,
    query_mask: Any = None,
    seed: int = 0,
    layout: str = "bhnd",
    **params: Any,
) -> torch.Tensor:
    """Attention of CPU float32 tensors, differentiable w.r.t. ``q``, ``k`` and ``v``.

    Shapes and arguments as :func:`randattn.forward`: ``[batch, heads, n, d]`` (or
    ``[batch, n, heads, d]`` with ``layout="bnhd"``), ``[batch, n]`` bool masks (True = keep),
    a method spec and its parameters, a seed for every random draw.
    """
    return _Attention.apply(q, k, v, method, key_mask, query_mask, seed, layout, params)


class Attention(torch.nn.Module):
    """Attention as a module: ``Attention("performer", features=64, seed=3)(q, k, v, key_mask)``.

    In training mode each call draws new samples (the seed, then the call count), as a model's
    dropout does; in evaluation mode every call uses ``seed``, so evaluation is repeatable.
    """

    def __init__(self, method: str = "exact", *, seed: int = 0, layout: str = "bhnd", **params: Any):
        super().__init__()
        self.spec = randattn.spec(method, **params)
        self.seed = seed
        self.layout = layout
        self.calls = 0

    def forward(self, q, k, v, key_mask=None, query_mask=None):  # type: ignore[override]
        seed = self.seed
        if self.training:
            seed = (self.seed * 0x9E3779B97F4A7C15 + self.calls) % 2**64
            self.calls += 1
        return attention(q, k, v, self.spec, key_mask=key_mask, query_mask=query_mask,
                         seed=seed, layout=self.layout)

    def extra_repr(self) -> str:
        return f"{self.spec!r}, seed={self.seed}, layout={self.layout!r}"
