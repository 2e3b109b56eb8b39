"""randattn.torch: gradients equal torch's for exact attention and the core's backward for the
randomized methods; bad tensors are clear errors. Skipped when torch is not installed."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import randattn  # noqa: E402
import randattn.torch as rt  # noqa: E402


def tensors(b=2, h=3, n=50, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, requires_grad=True) for _ in range(3)]


def test_exact_matches_sdpa_forward_and_gradients_with_padding():
    q, k, v = tensors()
    mask = torch.ones(2, 50, dtype=torch.bool)
    mask[1, 35:] = False
    out = rt.attention(q, k, v, key_mask=mask)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    assert torch.allclose(out, ref, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


@pytest.mark.parametrize("method", ["performer", "yoso", "lara", "skeinformer", "nystrom"])
def test_randomized_gradients_are_the_cores_backward_with_the_same_samples(method):
    q, k, v = tensors(seed=1)
    out = rt.attention(q, k, v, method, seed=5)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_out, saved = randattn.forward(*(x.detach().numpy() for x in (q, k, v)), method, seed=5)
    assert np.array_equal(out.detach().numpy(), ref_out)
    for a, b in zip(grads, randattn.backward(saved, g.numpy())):
        assert np.array_equal(a.numpy(), b)


def test_the_module_redraws_in_training_and_repeats_in_evaluation():
    q, k, v = tensors()
    layer = rt.Attention("performer", features=16, seed=3)
    a, b = layer(q, k, v), layer(q, k, v)
    assert not torch.equal(a, b)
    layer.eval()
    assert torch.equal(layer(q, k, v), layer(q, k, v))
    assert "performer:features=16" in repr(layer)


def test_bad_tensors_are_clear_errors():
    q, k, v = tensors()
    with pytest.raises(TypeError, match="float32"):
        rt.attention(q.double(), k, v)
    with pytest.raises(TypeError, match="torch.Tensor"):
        rt.attention(q.detach().numpy(), k, v)
    with pytest.raises(ValueError, match="unknown method"):
        rt.attention(q, k, v, "nope")


def test_mca_gradients_reach_the_layer_input_and_the_projection():
    g = torch.Generator().manual_seed(3)
    q, k = (torch.randn(2, 3, 20, 8, generator=g, requires_grad=True) for _ in range(2))
    x = torch.randn(2, 20, 16, generator=g, requires_grad=True)
    wv = torch.randn(16, 24, generator=g, requires_grad=True)
    bv = torch.randn(24, generator=g, requires_grad=True)
    out = rt.projected_attention(q, k, x, wv, bv, "mca", alpha=0.2, seed=4)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, x, wv, bv), grad)
    ref_out, saved = randattn.forward_projected(
        *(t.detach().numpy() for t in (q, k, x, wv, bv)), "mca", alpha=0.2, seed=4
    )
    assert np.array_equal(out.detach().numpy(), ref_out)
    for a, b in zip(got, randattn.backward_projected(saved, grad.numpy())):
        assert np.array_equal(a.numpy(), b)
