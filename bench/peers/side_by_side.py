#!/usr/bin/env python3
"""Side by side: every method of ours against its authors' PyTorch code, on this machine, now.

For each row and length it runs the peer script and `randattn bench` each in a fresh process
(the same glibc malloc settings for both, see `peer_timing.py`), and prints the table of
medians — peer and ours, forward and forward + backward, and the ratios peer ÷ ours — as
markdown, plus JSON with --json. Not part of CI: it needs torch and the peers' clones.

    python3 -m venv /tmp/torchenv
    /tmp/torchenv/bin/pip install torch numpy einops transformers
    git clone https://github.com/pkuzengqi/Skeinformer /tmp/peers/Skeinformer
    git clone https://github.com/HKUNLP/efficient-attention /tmp/peers/efficient-attention
    cargo build --release -p randattn-cli
    /tmp/torchenv/bin/python bench/peers/side_by_side.py --skeinformer /tmp/peers/Skeinformer \
        --efficient-attention /tmp/peers/efficient-attention --n 1024,4096

`--rows` picks rows by label (`lara,nystrom`); `--ours-only` skips the peers (for profiling
rounds against figures you already have).
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TUNABLES = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=17179869184"

# label, peer (script, repo option, method, budget), our method spec
ROWS = [
    ("lara", ("efficient_attention_repo.py", "efficient_attention", "lara", 64), "lara:proposals=64"),
    ("nystrom", ("skeinformer_repo.py", "skeinformer", "nystrom", 64), "nystrom:landmarks=64"),
    ("linformer", ("skeinformer_repo.py", "skeinformer", "linformer", 256), "linformer:k=256"),
    ("skeinformer", ("skeinformer_repo.py", "skeinformer", "skeinformer", 256),
     "skeinformer:budget=256"),
    ("informer", ("skeinformer_repo.py", "skeinformer", "informer", 5), "informer:factor=5"),
    ("performer", ("efficient_attention_repo.py", "efficient_attention", "performer", 256),
     "performer:features=256"),
    ("yoso-e", ("transformers_yoso.py", "transformers", "yoso-e", 12), "yoso-e:tau=12"),
    ("ra", ("efficient_attention_repo.py", "efficient_attention", "ra", 1), "ra:samples=1"),
    ("exact", ("torch_sdpa.py", None, None, None), "exact"),
]


def cpu_name():
    """The CPU's model name and its widest vector extension (from /proc/cpuinfo)."""
    name, flags = platform.processor() or "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{name} ({simd}, {os.cpu_count()} logical CPUs)"


def run_json(cmd, env):
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-2000:]}")
    return out.stdout


def sdpa(a, n, env):
    """PyTorch's scaled_dot_product_attention, through `torch_sdpa.py` (its own JSON)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "sdpa.json")
        cmd = [sys.executable, os.path.join(HERE, "torch_sdpa.py"), "--n", str(n), "--heads",
               str(a.heads), "--d", str(a.d), "--batch", str(a.batch), "--backward", "--json", path]
        run_json(cmd, {**env, "OMP_NUM_THREADS": str(a.threads)})
        if not os.path.exists(path):
            raise RuntimeError("torch_sdpa.py wrote no result (is torch installed?)")
        with open(path) as fh:
            r = json.load(fh)["results"][0]
    return r["forward_ms"], r["forward_ms"] + r["backward_ms"]


def peer(a, row, n, env):
    script, repo_opt, method, budget = row[1]
    if script == "torch_sdpa.py":
        return sdpa(a, n, env)
    cmd = [sys.executable, os.path.join(HERE, script), "--n", str(n), "--heads", str(a.heads),
           "--d", str(a.d), "--batch", str(a.batch), "--threads", str(a.threads), "--json"]
    if method is not None:
        cmd += ["--method", method, "--budget", str(budget)]
    if repo_opt is not None and getattr(a, repo_opt):
        cmd += ["--repo", getattr(a, repo_opt)]
    lines = [line for line in run_json(cmd, env).splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"{' '.join(cmd)} printed no result (is torch installed?)")
    r = json.loads(lines[-1])
    return r["forward_ms"], r["forward_backward_ms"]


def ours(a, spec, n, env):
    cmd = [a.randattn, "bench", "--methods", spec, "--n", str(n), "--heads", str(a.heads),
           "--d", str(a.d), "--batch", str(a.batch), "--backward", "--no-baseline", "--quiet",
           "--json", "-"]
    env = {**env, "RAYON_NUM_THREADS": str(a.threads)}
    # bench also times `exact` (its speed-up column's baseline): take the named method's row
    name = spec.split(":")[0]
    r = next(r for r in json.loads(run_json(cmd, env))["results"] if r["method"] == name)
    return r["forward_ms"], r["forward_ms"] + r["backward_ms"]


def median_pair(pairs):
    """Median forward and median forward + backward over several runs."""
    return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--skeinformer", help="clone of pkuzengqi/Skeinformer")
    p.add_argument("--efficient-attention", dest="efficient_attention",
                   help="clone of HKUNLP/efficient-attention")
    p.add_argument("--transformers", help="clone of huggingface/transformers (default: installed)")
    p.add_argument("--randattn", default=os.path.join(ROOT, "target", "release", "randattn"))
    p.add_argument("--n", default="1024,4096")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", help="comma-separated labels (default: all)")
    p.add_argument("--ours-only", action="store_true")
    p.add_argument("--runs", type=int, default=1,
                   help="fresh processes per measurement, peer and ours; the median is reported")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args()
    if not os.path.exists(a.randattn):
        p.error(f"{a.randattn} not found: cargo build --release -p randattn-cli, or --randattn")
    chosen = a.rows.split(",") if a.rows else [r[0] for r in ROWS]
    unknown = set(chosen) - {r[0] for r in ROWS}
    if unknown:
        p.error(f"unknown rows {sorted(unknown)}; rows: {', '.join(r[0] for r in ROWS)}")
    env = {**os.environ, "GLIBC_TUNABLES": TUNABLES}
    results = []
    for n in [int(x) for x in a.n.split(",")]:
        print(f"\nn = {n}, batch {a.batch}, heads {a.heads}, d {a.d}, {a.threads} threads, "
              f"{cpu_name()}\n")
        print("| method (peer code) | peer fwd / f+b ms | ours fwd / f+b ms | peer ÷ ours fwd "
              "| peer ÷ ours f+b |")
        print("|---|---|---|---|---|")
        for row in ROWS:
            if row[0] not in chosen:
                continue
            of, ofb = median_pair([ours(a, row[2], n, env) for _ in range(a.runs)])
            pf = pfb = None
            if not a.ours_only:
                try:
                    pf, pfb = median_pair([peer(a, row, n, env) for _ in range(a.runs)])
                except RuntimeError as e:
                    print(f"peer of {row[0]} failed: {e}", file=sys.stderr)
            ratio = (lambda x, y: f"{x / y:.2f}" if x else "-")
            peer_cell = f"{pf:.1f} / {pfb:.1f}" if pf else "-"
            print(f"| {row[0]} ({row[1][0]}) | {peer_cell} | {of:.1f} / {ofb:.1f} | "
                  f"{ratio(pf, of)} | {ratio(pfb, ofb)} |", flush=True)
            results.append({"row": row[0], "spec": row[2], "n": n, "peer_forward_ms": pf,
                            "peer_forward_backward_ms": pfb, "ours_forward_ms": of,
                            "ours_forward_backward_ms": ofb})
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"cpu": cpu_name(), "batch": a.batch, "heads": a.heads, "d": a.d,
                       "threads": a.threads, "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
