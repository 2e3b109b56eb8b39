"""randattn: randomized approximations of transformer self-attention, fast on CPUs.

Every method of the Rust library — exact softmax, YOSO, Performer, Linformer, Informer,
Nystromformer, Skeinformer, RA/LARA, V-Mean — on float32 numpy arrays, forward and backward,
with key and query masks and explicit seeds (the same spec and seed give the same bits as the
``randattn`` command line). ``randattn.torch`` wraps it as a PyTorch autograd function and
``randattn.hf`` as a Hugging Face attention implementation; both import their framework only
when used.

    >>> import numpy as np, randattn
    >>> q = k = v = np.random.default_rng(0).standard_normal((1, 2, 64, 16), dtype=np.float32)
    >>> out = randattn.attention(q, k, v, "performer", features=32, seed=7)
    >>> out.shape
    (1, 2, 64, 16)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _randattn
from ._randattn import __version__, get_num_threads, keep_freed_memory, set_num_threads

__all__ = [
    "Saved",
    "attention",
    "backward",
    "backward_projected",
    "forward",
    "forward_projected",
    "get_num_threads",
    "keep_freed_memory",
    "methods",
    "set_num_threads",
    "spec",
    "__version__",
]

LAYOUTS = ("bhnd", "bnhd")


def methods() -> list[dict[str, Any]]:
    """The catalog: one dict per method (``name``, ``summary``, ``cost``, ``random``,
    ``approximates_softmax``, ``needs_value_projection``, ``params`` with each parameter's
    ``name``, ``default``, ``range`` and ``help``)."""
    return _randattn.methods()


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _settings(params: dict[str, Any]) -> list[tuple[str, str]]:
    return [(key, _text(value)) for key, value in params.items()]


def spec(method: str = "exact", **params: Any) -> str:
    """The canonical method spec of ``method`` with ``params`` (``performer:features=64``), as
    the command line and the results tables write it; ``ValueError`` if it is not valid."""
    return _randattn.canonical_spec(method, _settings(params))


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'bhnd' or 'bnhd', got {layout!r}")


def _tensor(x: Any, name: str, layout: str) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(x).__name__}")
    if x.dtype != np.float32:
        raise TypeError(
            f"{name} must be float32, got {x.dtype} (convert with {name}.astype(np.float32))"
        )
    if x.ndim != 4:
        want = "[batch, heads, n, d]" if layout == "bhnd" else "[batch, n, heads, d]"
        raise ValueError(f"{name} must be 4-D {want}, got shape {list(x.shape)}")
    if layout == "bnhd":
        x = x.transpose(0, 2, 1, 3)
    # Zero-copy when already C-contiguous in the canonical layout.
    return np.ascontiguousarray(x)


def _mask(m: Any, name: str) -> np.ndarray | None:
    if m is None:
        return None
    a = np.asarray(m)
    if a.dtype != np.bool_:
        if not np.issubdtype(a.dtype, np.integer) or not np.isin(a, (0, 1)).all():
            raise TypeError(f"{name} must be bool (True = keep) or 0/1 integers, got {a.dtype}")
        a = a.astype(np.bool_)
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D [batch, n], got shape {list(a.shape)}")
    return np.ascontiguousarray(a)


class Saved:
    """What a :func:`forward` keeps for its :func:`backward`: the inputs, the seed and the
    samples the forward drew (opaque)."""

    __slots__ = ("_native", "layout", "projected")

    def __init__(self, native: Any, layout: str, projected: bool = False) -> None:
        self._native = native
        self.layout = layout
        self.projected = projected

    @property
    def spec(self) -> str:
        """The method spec the forward ran."""
        return self._native.spec

    @property
    def seed(self) -> int:
        """The seed the forward ran with."""
        return self._native.seed

    def __repr__(self) -> str:
        return f"<randattn.Saved {self.spec} seed={self.seed} layout={self.layout}>"


def forward(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    method: str = "exact",
    *,
    key_mask: Any = None,
    query_mask: Any = None,
    seed: int = 0,
    layout: str = "bhnd",
    **params: Any,
) -> tuple[np.ndarray, Saved]:
    """Attention output and the :class:`Saved` state its backward needs.

    ``q``, ``k``, ``v``: float32 ``[batch, heads, n, d]`` (``layout="bhnd"``) or
    ``[batch, n, heads, d]`` (``layout="bnhd"``, what Hugging Face and flash-attn hand over; the
    output comes back in the same layout). ``method``: a method spec (``"performer"``,
    ``"performer:features=64"``); ``params`` set further parameters (``features=64``).
    ``key_mask`` / ``query_mask``: ``[batch, n]`` bool, True = keep. ``seed``: every random draw.
    """
    _check_layout(layout)
    qc, kc, vc = (_tensor(x, name, layout) for x, name in ((q, "q"), (k, "k"), (v, "v")))
    if not isinstance(seed, (int, np.integer)) or seed < 0 or seed >= 2**64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    out, native = _randattn.forward(
        qc,
        kc,
        vc,
        method,
        _settings(params),
        _mask(key_mask, "key_mask"),
        _mask(query_mask, "query_mask"),
        int(seed),
    )
    if layout == "bnhd":
        out = out.transpose(0, 2, 1, 3)
    return out, Saved(native, layout)


def backward(saved: Saved, grad_out: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients ``(dq, dk, dv)`` of a loss given the gradient of the output (in the forward's
    layout), with the forward's samples."""
    if not isinstance(saved, Saved) or saved.projected:
        raise TypeError(
            "saved must be what randattn.forward returned (backward_projected takes "
            "forward_projected's)"
        )
    dq, dk, dv, _ = _backward(saved, grad_out)
    return dq, dk, dv


def _backward(saved: Saved, grad_out: np.ndarray):
    g = _tensor(grad_out, "grad_out", saved.layout)
    dq, dk, dv, params = _randattn.backward(saved._native, g)
    if saved.layout == "bnhd":
        dq, dk, dv = (x.transpose(0, 2, 1, 3) for x in (dq, dk, dv))
    return dq, dk, dv, params


def attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    method: str = "exact",
    *,
    key_mask: Any = None,
    query_mask: Any = None,
    seed: int = 0,
    layout: str = "bhnd",
    **params: Any,
) -> np.ndarray:
    """The attention output alone (see :func:`forward`)."""
    out, _ = forward(
        q, k, v, method, key_mask=key_mask, query_mask=query_mask, seed=seed, layout=layout,
        **params,
    )
    return out


def _array(x: Any, name: str, ndim: int, shape_text: str) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(x).__name__}")
    if x.dtype != np.float32:
        raise TypeError(
            f"{name} must be float32, got {x.dtype} (convert with {name}.astype(np.float32))"
        )
    if x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D {shape_text}, got shape {list(x.shape)}")
    return np.ascontiguousarray(x)


def forward_projected(
    q: np.ndarray,
    k: np.ndarray,
    x: np.ndarray,
    wv: np.ndarray,
    bv: np.ndarray | None = None,
    method: str = "mca",
    *,
    key_mask: Any = None,
    query_mask: Any = None,
    seed: int = 0,
    layout: str = "bhnd",
    **params: Any,
) -> tuple[np.ndarray, Saved]:
    """Forward pass of a method that samples the value projection (MCA): instead of V, the
    layer input ``x`` ``[batch, n, d_model]``, ``wv`` ``[d_model, heads·d_v]`` (head ``h`` is
    columns ``h·d_v .. (h+1)·d_v``) and optionally ``bv`` ``[heads·d_v]``; the rest as
    :func:`forward`."""
    _check_layout(layout)
    qc, kc = _tensor(q, "q", layout), _tensor(k, "k", layout)
    xc = _array(x, "x", 3, "[batch, n, d_model]")
    wc = _array(wv, "wv", 2, "[d_model, heads*d_v]")
    bc = None if bv is None else _array(bv, "bv", 1, "[heads*d_v]")
    if not isinstance(seed, (int, np.integer)) or seed < 0 or seed >= 2**64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    out, native = _randattn.forward_projected(
        qc, kc, xc, wc, bc, method, _settings(params), _mask(key_mask, "key_mask"),
        _mask(query_mask, "query_mask"), int(seed),
    )
    if layout == "bnhd":
        out = out.transpose(0, 2, 1, 3)
    return out, Saved(native, layout, projected=True)


def backward_projected(saved: Saved, grad_out: np.ndarray):
    """Gradients ``(dq, dk, dx, dwv, dbv)`` of a :func:`forward_projected` (``dbv`` is None
    without a bias), with the forward's samples."""
    if not isinstance(saved, Saved) or not saved.projected:
        raise TypeError("saved must be what randattn.forward_projected returned")
    dq, dk, _, params = _backward(saved, grad_out)
    return dq, dk, params["x"], params["wv"], params.get("bv")
