"""randattn in any Hugging Face model that supports attention backends (BERT, RoBERTa, ...):
``attn_implementation=randattn.hf.register("performer:features=64")``.

``register`` adds an attention function and the matching mask function under one name
(``randattn_performer_features_64``): without a mask function Hugging Face silently drops padding
masks for custom attention. Key-padding masks are honoured; a causal, sliding-window or other
query-dependent mask raises ``NotImplementedError`` instead of being ignored; grouped-query
heads are expanded; each layer draws its own samples (the seed plus the layer's index).

    >>> import randattn.hf
    >>> name = randattn.hf.register("nystrom", seed=0)
    >>> model = AutoModel.from_pretrained(path, attn_implementation=name)   # doctest: +SKIP
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch

import randattn
import randattn.torch as rt

__all__ = ["apply_mca", "register"]

_WARNED_DROPOUT: set[str] = set()


def _name_of(spec: str) -> str:
    # Hugging Face reads names with "/" as Hub kernels; keep to letters, digits and "_".
    return "randattn_" + re.sub(r"[^A-Za-z0-9]+", "_", spec).strip("_")


def _key_mask(attention_mask: Any, batch: int, n_k: int) -> torch.Tensor | None:
    """The ``[batch, n_k]`` keep-mask of a Hugging Face attention mask, or an error when the mask
    depends on the query (causal, sliding window, custom)."""
    if attention_mask is None:
        return None
    m = attention_mask
    if m.dim() == 2:
        return m.bool()
    if m.dim() != 4:
        raise NotImplementedError(f"randattn: an attention mask of shape {list(m.shape)}")
    if m.dtype != torch.bool:
        # Additive masks: 0 keeps, the dtype's minimum drops; other biases (ALiBi, relative
        # positions) cannot be expressed as a key mask.
        low = torch.finfo(m.dtype).min
        dropped = m <= low / 2
        if not torch.all(dropped | (m == 0)):
            raise NotImplementedError("randattn: additive attention biases other than padding")
        m = ~dropped
    if m.shape[1] != 1:
        raise NotImplementedError("randattn: per-head attention masks")
    rows = m[:, 0]
    if rows.shape[1] > 1 and not torch.equal(rows, rows[:, :1].expand_as(rows)):
        raise NotImplementedError(
            "randattn supports key-padding masks only; this model passes a causal, sliding-window "
            "or other query-dependent mask"
        )
    keep = rows[:, 0]
    if keep.shape != (batch, n_k):
        keep = keep.expand(batch, n_k)
    return keep


def _mask_function(**kwargs: Any) -> torch.Tensor | None:
    """Hugging Face mask function: a ``[batch, 1, 1, n_k]`` key-padding mask for bidirectional
    attention (or ``None`` when nothing is padded); any other pattern is built as SDPA builds it,
    and the attention function then refuses it."""
    from transformers import masking_utils as mu

    if kwargs.get("mask_function") is mu.bidirectional_mask_function:
        padding = kwargs.get("attention_mask")
        if padding is None:
            return None
        kv_length, kv_offset = kwargs["kv_length"], kwargs.get("kv_offset", 0)
        padding = mu.prepare_padding_mask(padding, kv_length, kv_offset)
        keep = padding[:, kv_offset : kv_offset + kv_length].bool()
        if bool(keep.all()):
            return None
        return keep[:, None, None, :]
    return mu.sdpa_mask(**kwargs)


def register(spec: str = "exact", *, seed: int = 0, name: str | None = None, **params: Any) -> str:
    """Registers ``spec`` (with ``params``) as a Hugging Face attention implementation and
    returns its name, for ``from_pretrained(..., attn_implementation=name)``,
    ``model.set_attn_implementation(name)`` or sentence-transformers'
    ``model_kwargs={"attn_implementation": name}``."""
    from transformers import AttentionInterface, AttentionMaskInterface

    canonical = randattn.spec(spec, **params)
    name = name or _name_of(canonical)
    if "/" in name:
        raise ValueError(f"attention names with '/' are Hub kernels to Hugging Face: {name!r}")
    method = next(m for m in randattn.methods() if m["name"] == canonical.split(":")[0])
    if method["needs_value_projection"]:
        raise ValueError(
            f"{method['name']} samples the value projection, which a Hugging Face attention "
            "function does not receive: use randattn.hf.apply_mca(model, ...)"
        )
    has_scale = any(p["name"] == "scale" for p in method["params"])

    def attention_function(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                           **kwargs):
        if getattr(module, "is_causal", False):
            raise NotImplementedError(
                f"{canonical}: causal attention is not supported by randattn's estimators"
            )
        if kwargs.get("sliding_window"):
            raise NotImplementedError(f"{canonical}: sliding-window attention")
        if dropout and module.training and canonical not in _WARNED_DROPOUT:
            _WARNED_DROPOUT.add(canonical)
            warnings.warn(
                f"{canonical}: attention dropout ({dropout}) is not applied (the randomized "
                "methods never build the attention matrix it would drop from)",
                stacklevel=2,
            )
        groups = getattr(module, "num_key_value_groups", 1) or 1
        if groups > 1:
            key = key.repeat_interleave(groups, dim=1)
            value = value.repeat_interleave(groups, dim=1)
        b, _, _, d = query.shape
        extra = {}
        if scaling is not None and abs(scaling - d**-0.5) > 1e-12 * d**-0.5:
            if not has_scale:
                raise NotImplementedError(f"{canonical}: scaling {scaling} (its kernel fixes 1/sqrt(d))")
            extra["scale"] = repr(float(scaling))
        layer = getattr(module, "layer_idx", None) or 0
        keep = _key_mask(attention_mask, b, key.shape[2])
        # [B, H, N, D] views of [B, N, H, D] buffers: hand them over in that order.
        out = rt.attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), canonical,
            key_mask=keep, seed=(seed + layer) % 2**64, layout="bnhd", **extra,
        )
        return out.contiguous(), None

    AttentionInterface.register(name, attention_function)
    AttentionMaskInterface.register(name, _mask_function)
    return name


def apply_mca(model: torch.nn.Module, *, seed: int = 0, **params: Any) -> int:
    """Makes every BERT-style self-attention of ``model`` (modules with ``query``, ``key`` and
    ``value`` linear layers) run MCA: exact softmax weights, the value projection ``X·W_V`` sampled
    per token (``params``: ``alpha``, ``probs``, ``draws``; see ``randattn.methods()``). Layer
    ``i`` draws from ``seed + i``. Returns how many modules it changed. Padding masks are
    honoured; causal modules raise ``NotImplementedError``."""
    spec = randattn.spec("mca", **params)
    changed = 0
    for i, module in enumerate(m for m in model.modules() if _is_bert_self_attention(m)):
        module.forward = _mca_forward(module, spec, (seed + i) % 2**64)
        changed += 1
    if changed == 0:
        raise ValueError("no BERT-style self-attention (query, key, value linear layers) found")
    return changed


def _is_bert_self_attention(m: torch.nn.Module) -> bool:
    return all(isinstance(getattr(m, a, None), torch.nn.Linear) for a in ("query", "key", "value")) \
        and hasattr(m, "attention_head_size")


def _mca_forward(module: torch.nn.Module, spec: str, seed: int):
    def forward(hidden_states, attention_mask=None, *args, **kwargs):
        if getattr(module, "is_causal", False) or kwargs.get("encoder_hidden_states") is not None:
            raise NotImplementedError(f"{spec}: causal or cross-attention")
        b, n, _ = hidden_states.shape
        d = module.attention_head_size
        q = module.query(hidden_states).view(b, n, -1, d)
        k = module.key(hidden_states).view(b, n, -1, d)
        scaling = getattr(module, "scaling", d**-0.5)
        extra = {} if abs(scaling - d**-0.5) <= 1e-12 * d**-0.5 else {"scale": repr(float(scaling))}
        out = rt.projected_attention(
            q, k, hidden_states, module.value.weight.t(), module.value.bias, spec,
            key_mask=_key_mask(attention_mask, b, n), seed=seed, layout="bnhd", **extra,
        )
        return out.reshape(b, n, -1), None

    return forward
