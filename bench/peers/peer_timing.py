"""The timing protocol shared by the peer scripts in this folder (not a peer itself).

One configuration per process; `torch.set_num_threads(THREADS)`; at least two warm-up calls and
0.5 s of warm-up; then SAMPLES samples, each the mean of as many calls as fill 0.3 s (one call
at least); the median of the samples is reported, in milliseconds. Forward is timed under
`torch.no_grad()`; forward + backward is one call of forward then `backward(grad_output)` with
the gradients of Q, K and V cleared in between.

Run the scripts with the glibc settings `side_by_side.py` uses
(`GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=17179869184`):
without them, fresh-page faults of PyTorch's large temporaries dominate some methods.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

try:
    import torch
except ImportError:  # the scripts say so and exit 0: peers are optional
    torch = None

WARMUP_CALLS = 2
WARMUP_S = 0.5
SAMPLE_S = 0.3


def require_torch():
    if torch is None:
        print("torch is not importable here; nothing to compare", file=sys.stderr)
        sys.exit(0)


def base_parser(description, methods):
    """The arguments every peer script takes; `methods` are the peer's method names."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--repo", help="folder of the peer's code (a clone of its repository)")
    p.add_argument("--method", required=True, choices=methods)
    p.add_argument("--n", type=int, default=4096, help="sequence length")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--d", type=int, default=64, help="head dimension of Q, K and V")
    p.add_argument("--budget", type=int, help="the method's budget (landmarks, features, k, ...)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--samples", type=int, default=7)
    p.add_argument("--forward-only", action="store_true", help="skip forward + backward")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p


def import_repo(parser, repo, name, subdir, package):
    """Puts `repo/subdir` (holding `package`) first on the import path, or stops with an error
    naming the repository `name` to clone."""
    if not repo:
        parser.error(f"--repo: the folder of a clone of {name}")
    src = os.path.join(repo, subdir)
    if not os.path.isdir(os.path.join(src, package)):
        parser.error(f"--repo: {src}/{package} not found; point --repo at a clone of {name}")
    sys.path.insert(0, src)


def median_ms(fn, samples):
    """Median over `samples` of the mean wall time of `fn()` within SAMPLE_S, after warm-up."""
    start = time.perf_counter()
    calls = 0
    while calls < WARMUP_CALLS or time.perf_counter() - start < WARMUP_S:
        fn()
        calls += 1
    means = []
    for _ in range(samples):
        t0 = time.perf_counter()
        calls = 0
        while True:
            fn()
            calls += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= SAMPLE_S:
                break
        means.append(elapsed * 1e3 / calls)
    return statistics.median(means)


def inputs(a):
    """Q, K, V of N(0, 1) entries, [batch, heads, n, d], requiring gradients, and a grad_output."""
    torch.manual_seed(0)
    shape = (a.batch, a.heads, a.n, a.d)
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape)
    return q, k, v, grad


def measure(a, peer, method_label, budget, call, q, k, v, grad):
    """Times `call(q, k, v)` forward and forward + backward; prints the result (text or JSON)."""
    torch.set_num_threads(a.threads)

    def forward():
        with torch.no_grad():
            call(q, k, v)

    def forward_backward():
        out = call(q, k, v)
        out.backward(grad)
        q.grad = k.grad = v.grad = None

    forward_ms = median_ms(forward, a.samples)
    fb_ms = None if a.forward_only else median_ms(forward_backward, a.samples)
    result = {
        "peer": peer,
        "method": method_label,
        "budget": budget,
        "batch": a.batch,
        "heads": a.heads,
        "n": a.n,
        "d": a.d,
        "threads": a.threads,
        "forward_ms": forward_ms,
        "forward_backward_ms": fb_ms,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if a.json:
        print(json.dumps(result))
    else:
        fb = "-" if fb_ms is None else f"{fb_ms:.1f}"
        print(f"{peer} {method_label} (budget {budget}) n={a.n}: forward {forward_ms:.1f} ms, "
              f"forward+backward {fb} ms (torch {torch.__version__}, {a.threads} threads)")
