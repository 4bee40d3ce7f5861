"""Peak matmul throughput of this CPU, measured once per benchmark run (the MFU denominator).

Method: square ``torch.mm`` of n x n matrices (n = 2048, large enough that the GEMM kernel runs at its
best and small enough to stay in a few MB of cache per tile), with the benchmark's thread count, in
fp32 and in bf16 (the kernel autocast picks on a CPU with avx512_bf16). Each trial times ``reps``
back-to-back products; the *best* trial is reported, because on a shared machine the best trial is
the one least disturbed by other work. FLOPs = 2 n^3 per product.

    .venv/bin/python -m bench.flops --threads 2   ->   {"fp32": GFLOP/s, "bf16": GFLOP/s}
"""

from __future__ import annotations

import argparse
import json
import time


def peak_gflops(dtype_name: str, n: int = 2048, reps: int = 4, trials: int = 7) -> float:
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up: kernel selection, page faults
    best = float("inf")
    for _ in range(trials):
        t = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 * reps / best / 1e9


def main(argv=None) -> None:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(json.dumps({p: round(peak_gflops(p), 1) for p in ("fp32", "bf16")}))


if __name__ == "__main__":
    main()
