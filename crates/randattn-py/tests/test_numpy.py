"""The numpy API against its contract: the same bits as the command line for every method, the
two layouts, masks, seeds, threads, fork, bad input, and the backward against finite
differences. Needs only numpy (and the `randattn` binary for the CLI comparison: RANDATTN_CLI,
or target/release/randattn of the repository)."""

from __future__ import annotations

import os
import pathlib
import subprocess

import numpy as np
import pytest

import randattn

REPO = pathlib.Path(__file__).resolve().parents[3]


def rand(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def qkv(b=2, h=3, n=40, d=8, seed=0):
    return rand(b, h, n, d, seed=seed), rand(b, h, n, d, seed=seed + 1), rand(b, h, n, d, seed=seed + 2)


def softmax_reference(q, k, v, key_mask=None):
    s = np.einsum("bhqd,bhkd->bhqk", q.astype(np.float64), k.astype(np.float64)) / np.sqrt(q.shape[-1])
    if key_mask is not None:
        s = np.where(key_mask[:, None, None, :], s, -np.inf)
    s -= s.max(-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bhkd->bhqd", p, v.astype(np.float64))


# Every method a numpy caller can run (MCA needs the layer input and W_V instead of V).
METHODS = [m["name"] for m in randattn.methods() if not m["needs_value_projection"]]


def test_the_catalog_lists_every_method_with_its_parameters():
    names = [m["name"] for m in randattn.methods()]
    for want in ["exact", "yoso", "yoso-e", "performer", "linformer", "informer", "nystrom",
                 "skeinformer", "ra", "lara", "vmean", "mca"]:
        assert want in names
    performer = next(m for m in randattn.methods() if m["name"] == "performer")
    features = next(p for p in performer["params"] if p["name"] == "features")
    assert features["default"] == "256" and features["range"]
    assert randattn.spec("performer", features=64, orthogonal=False) == "performer:features=64:orthogonal=false"


def test_exact_is_softmax_attention_with_and_without_a_key_mask():
    q, k, v = qkv()
    np.testing.assert_allclose(randattn.attention(q, k, v), softmax_reference(q, k, v), atol=2e-6)
    mask = np.ones((2, 40), dtype=bool)
    mask[0, 25:] = False
    got = randattn.attention(q, k, v, key_mask=mask)
    np.testing.assert_allclose(got, softmax_reference(q, k, v, mask), atol=2e-6)
    # Masked keys do not matter: changing them changes nothing.
    k2, v2 = k.copy(), v.copy()
    k2[0, :, 25:] += 5.0
    v2[0, :, 25:] -= 3.0
    assert np.array_equal(randattn.attention(q, k2, v2, key_mask=mask), got)


def cli() -> pathlib.Path | None:
    if "RANDATTN_CLI" in os.environ:  # asked for: it must be there (CI sets it)
        path = pathlib.Path(os.environ["RANDATTN_CLI"])
        if not path.exists():
            raise FileNotFoundError(f"RANDATTN_CLI={path} does not exist")
        return path
    path = REPO / "target" / "release" / "randattn"
    return path if path.exists() else None


@pytest.mark.skipif(cli() is None, reason="the randattn binary is not built (set RANDATTN_CLI)")
@pytest.mark.parametrize("method", METHODS)
def test_every_method_gives_the_command_lines_bits(method, tmp_path):
    q, k, v = qkv(n=48, seed=11)
    mask = np.ones((2, 48), dtype=bool)
    mask[1, 30:] = False
    for name, x in [("q", q), ("k", k), ("v", v)]:
        np.save(tmp_path / f"{name}.npy", x)
    np.save(tmp_path / "mask.npy", mask)
    out = tmp_path / "out.npy"
    subprocess.run(
        [str(cli()), "run", "--method", method, "--q", str(tmp_path / "q.npy"), "--k",
         str(tmp_path / "k.npy"), "--v", str(tmp_path / "v.npy"), "--mask",
         str(tmp_path / "mask.npy"), "--seed", "5", "--out", str(out)],
        check=True, capture_output=True,
    )
    got = randattn.attention(q, k, v, method, key_mask=mask, seed=5)
    assert np.array_equal(got, np.load(out)), method


@pytest.mark.parametrize("method", ["exact", "performer", "yoso", "lara"])
def test_the_two_layouts_agree(method):
    q, k, v = qkv(seed=3)
    mask = np.ones((2, 40), dtype=bool)
    mask[1, :7] = False
    a, sa = randattn.forward(q, k, v, method, key_mask=mask, seed=9)
    t = lambda x: np.ascontiguousarray(x.transpose(0, 2, 1, 3))
    b, sb = randattn.forward(t(q), t(k), t(v), method, key_mask=mask, seed=9, layout="bnhd")
    assert b.shape == (2, 40, 3, 8)
    assert np.array_equal(t(b), a)
    g = rand(*a.shape, seed=4)
    for ga, gb in zip(randattn.backward(sa, g), randattn.backward(sb, t(g))):
        assert np.array_equal(t(gb), ga)


def test_masked_query_rows_are_zero_and_an_all_masked_batch_is_zero_not_nan():
    q, k, v = qkv()
    qmask = np.ones((2, 40), dtype=bool)
    qmask[0, 10:20] = False
    out = randattn.attention(q, k, v, "nystrom", query_mask=qmask)
    assert not out[0, :, 10:20].any() and out[0, :, :10].any()
    kmask = np.ones((2, 40), dtype=bool)
    kmask[1] = False
    out = randattn.attention(q, k, v, "exact", key_mask=kmask)
    assert np.isfinite(out).all() and not out[1].any()


def test_seeds_decide_the_samples():
    q, k, v = qkv()
    a = randattn.attention(q, k, v, "performer", features=16, seed=1)
    assert np.array_equal(a, randattn.attention(q, k, v, "performer", features=16, seed=1))
    assert not np.array_equal(a, randattn.attention(q, k, v, "performer", features=16, seed=2))
    # A spec and keyword parameters are the same thing.
    assert np.array_equal(a, randattn.attention(q, k, v, "performer:features=16", seed=1))


def test_keeping_freed_memory_changes_no_result():
    q, k, v = qkv()
    before = randattn.attention(q, k, v, "lara", seed=1)
    assert randattn.keep_freed_memory() in (True, False)
    assert np.array_equal(randattn.attention(q, k, v, "lara", seed=1), before)


def test_the_thread_count_is_settable_and_does_not_change_the_bits():
    q, k, v = qkv(n=200)
    before = randattn.get_num_threads()
    try:
        randattn.set_num_threads(1)
        assert randattn.get_num_threads() == 1
        one = randattn.attention(q, k, v, "skeinformer", seed=3)
        randattn.set_num_threads(3)
        three = randattn.attention(q, k, v, "skeinformer", seed=3)
        assert np.array_equal(one, three)
        with pytest.raises(ValueError, match="1..=4096"):
            randattn.set_num_threads(0)
    finally:
        randattn.set_num_threads(before)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_forked_child_can_run_after_the_parent_used_the_threads():
    q, k, v = qkv(n=300)
    want = randattn.attention(q, k, v, "lara", seed=2)  # the parent's pool is running
    pid = os.fork()
    if pid == 0:  # child: would deadlock on the parent's pool without the atfork hook
        ok = np.array_equal(randattn.attention(q, k, v, "lara", seed=2), want)
        os._exit(0 if ok else 3)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_bad_input_is_a_clear_error_never_a_crash():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="float32"):
        randattn.attention(q.astype(np.float64), k, v)
    with pytest.raises(TypeError, match="numpy array"):
        randattn.attention(q.tolist(), k, v)
    with pytest.raises(ValueError, match="4-D"):
        randattn.attention(q[0], k, v)
    with pytest.raises(ValueError, match="head dim|shape"):
        randattn.attention(q, k[..., :4], v)
    bad = q.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN|finite"):
        randattn.attention(bad, k, v)
    with pytest.raises(ValueError, match="unknown method"):
        randattn.attention(q, k, v, "softmax2")
    with pytest.raises(ValueError, match="features"):
        randattn.attention(q, k, v, "performer", features=0)
    with pytest.raises(ValueError, match="layout"):
        randattn.attention(q, k, v, layout="nhbd")
    with pytest.raises(ValueError, match="mask"):
        randattn.attention(q, k, v, key_mask=np.ones((2, 39), dtype=bool))
    with pytest.raises(ValueError, match="forward_projected"):
        randattn.attention(q, k, v, "mca")
    _, saved = randattn.forward(q, k, v)
    with pytest.raises(ValueError, match="grad_out has shape"):
        randattn.backward(saved, q[:, :, :5])


def test_the_backward_matches_finite_differences_of_the_forward():
    # Performer with fixed features (the seed) is a smooth function of q, k, v: check the
    # directional derivative along a random direction, in float64 arithmetic around f32 inputs.
    q, k, v = qkv(b=1, h=2, n=24, d=8, seed=21)
    _, saved = randattn.forward(q, k, v, "performer", features=64, seed=4)
    g = rand(1, 2, 24, 8, seed=22)
    grads = randattn.backward(saved, g)
    eps = 1e-2
    for i, name in enumerate("qkv"):
        u = rand(1, 2, 24, 8, seed=30 + i)
        def loss(x):
            args = [q, k, v]
            args[i] = x.astype(np.float32)
            out = randattn.attention(*args, "performer", features=64, seed=4)
            return float((out.astype(np.float64) * g).sum())
        base = [q, k, v][i].astype(np.float64)
        numeric = (loss(base + eps * u) - loss(base - eps * u)) / (2 * eps)
        analytic = float((grads[i].astype(np.float64) * u).sum())
        # float32 rounding of the loss (~1e-6 relative) over 2·eps, plus the O(eps²) term.
        assert abs(numeric - analytic) <= 2e-2 * max(1.0, abs(analytic)), (name, numeric, analytic)


@pytest.mark.skipif(cli() is None, reason="the randattn binary is not built (set RANDATTN_CLI)")
def test_mca_from_the_layer_input_gives_the_command_lines_bits_and_gradients(tmp_path):
    b, h, n, d, d_model = 2, 3, 40, 8, 20
    q, k = rand(b, h, n, d, seed=1), rand(b, h, n, d, seed=2)
    x, wv, bv = rand(b, n, d_model, seed=3), rand(d_model, h * d, seed=4), rand(h * d, seed=5)
    mask = np.ones((b, n), dtype=bool)
    mask[0, 33:] = False
    out, saved = randattn.forward_projected(q, k, x, wv, bv, "mca", alpha=0.5, key_mask=mask,
                                            seed=8)
    g = rand(*out.shape, seed=6)
    dq, dk, dx, dwv, dbv = randattn.backward_projected(saved, g)
    for name, a in [("q", q), ("k", k), ("x", x), ("wv", wv), ("bv", bv), ("mask", mask),
                    ("g", g)]:
        np.save(tmp_path / f"{name}.npy", a)
    args = [str(cli()), "run", "--method", "mca:alpha=0.5", "--seed", "8"]
    for flag, name in [("--q", "q"), ("--k", "k"), ("--x", "x"), ("--wv", "wv"), ("--bv", "bv"),
                       ("--mask", "mask"), ("--grad-out", "g")]:
        args += [flag, str(tmp_path / f"{name}.npy")]
    args += ["--out", str(tmp_path / "out.npy"), "--grads-dir", str(tmp_path / "grads")]
    subprocess.run(args, check=True, capture_output=True)
    assert np.array_equal(out, np.load(tmp_path / "out.npy"))
    for name, got in [("dq", dq), ("dk", dk), ("x", dx), ("wv", dwv), ("bv", dbv)]:
        assert np.array_equal(got, np.load(tmp_path / "grads" / f"{name}.npy")), name
    with pytest.raises(TypeError, match="forward_projected"):
        randattn.backward(saved, g)
    with pytest.raises(ValueError, match="takes V"):
        randattn.forward_projected(q, k, x, wv, bv, "exact")
