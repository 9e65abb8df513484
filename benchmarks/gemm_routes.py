"""The four fp32 routes of a linear layer on CPU, side by side, on the shapes InstructBLIP multiplies.

    python benchmarks/gemm_routes.py [--reps N]

For each (in, out) weight and row count it times `F.linear` (MKL's sgemm, what transformers calls), the few-row route
of `ops.linear` (`W @ x^T`), oneDNN's matmul on the same dense weight (`torch.ops.mkldnn._linear_pointwise`), and
the same on the weight packed in oneDNN's layout (what `ops.Linear` layers use when `ops.PACK` is on), in one process,
alternating, and prints the best time of each with the speed-ups of the two oneDNN routes over `F.linear`.
`ops.linear` takes the few-row route up to `ops.MAX_ROWS` rows and oneDNN above (when no gradient is needed). Each
weight is used call after call, so the smaller ones stay in cache: whole-model runs (`bench.py`) are what counts.
docs/performance.md ("CPU linear routes") has the measurements each route's choice rests on.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch
import torch.nn.functional as F

from instructblip.accel import cpu_linear as ops

SHAPES = [  # (in, out): ViT-g qkv, fc1, fc2, proj; Q-Former cross k|v, fc1, fc2; small LLaMA qkv and LM head
    (1408, 4224), (1408, 6144), (6144, 1408), (1408, 1408), (1408, 1536), (768, 3072), (3072, 768), (512, 1536),
    (512, 32000),
]
ROWS = [1, 2, 8, 16, 32, 64, 257, 2056]


def best_times(fns: dict, reps: int) -> dict:
    times = {name: float("inf") for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(reps):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name] = min(times[name], time.perf_counter() - t)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    if not ops.HAS_ONEDNN:
        raise SystemExit("this torch build has no oneDNN matmul (torch.ops.mkldnn._linear_pointwise)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; best of {args.reps}, fp32\n")
    print("| in x out | rows | F.linear | W @ x^T | oneDNN | packed | packed GFLOP/s | speed-up oneDNN / packed |")
    print("|---|---|---|---|---|---|---|---|")
    torch.manual_seed(0)
    with torch.inference_mode():
        for k, n in SHAPES:
            w, b = torch.randn(n, k) / k**0.5, torch.randn(n)
            packed = torch.ops.mkldnn._reorder_linear_weight(w, ops.PACK_ROWS)
            for m in ROWS:
                if m * k * n > 3e10:
                    continue
                x = torch.randn(m, k)
                fns = {"F.linear": partial(F.linear, x, w, b),
                       "W @ x^T": lambda x=x, w=w, b=b: torch.addmm(b[:, None], w, x.t()).t(),
                       "oneDNN": partial(torch.ops.mkldnn._linear_pointwise, x, w, b, "none", [], ""),
                       "packed": partial(torch.ops.mkldnn._linear_pointwise, x, packed, b, "none", [], "")}
                t = best_times(fns, args.reps if m < 1000 else max(2, args.reps // 4))
                ms = " | ".join(f"{t[name] * 1e3:.2f} ms" for name in fns)
                rate = 2 * m * k * n / t["packed"] / 1e9
                ups = f"{t['F.linear'] / t['oneDNN']:.2f}x / {t['F.linear'] / t['packed']:.2f}x"
                print(f"| {k} x {n} | {m} | {ms} | {rate:.0f} | {ups} |", flush=True)


if __name__ == "__main__":
    main()
