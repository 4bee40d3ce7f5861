"""Peak matmul throughput of this CPU (or with ``--device cuda`` of the GPU), measured once per benchmark run (the
MFU denominator).

Method: square ``torch.mm`` of n x n matrices (CPU: n = 2048, large enough that the GEMM kernel runs at its
best and small enough to stay in a few MB of cache per tile; GPU: n = 8192, enough tiles to fill every
multiprocessor), with the benchmark's thread count, in fp32 and in bf16 (on a CPU the kernel autocast picks on
one with avx512_bf16). Each trial times ``reps`` back-to-back products; the *best* trial is reported, because on a
shared machine the best trial is the one least disturbed by other work. FLOPs = 2 n^3 per product. On a GPU, fp32
runs without TF32 (torch's default, which neither side changes), and each trial ends with a synchronize.

    .venv/bin/python -m bench.flops --threads 2   ->   {"fp32": GFLOP/s, "bf16": GFLOP/s}
"""

from __future__ import annotations

import argparse
import json


def peak_gflops(dtype_name: str, n: int = 2048, reps: int = 4, trials: int = 7, device: str = "cpu") -> float:
    import torch

    from bench.common import now

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a = torch.randn(n, n).to(device, dtype)
    b = torch.randn(n, n).to(device, dtype)
    out = torch.empty(n, n, dtype=dtype, device=device)
    torch.mm(a, b, out=out)  # warm-up: kernel selection, page faults
    best = float("inf")
    for _ in range(trials):
        t = now(device)
        for _ in range(reps):
            torch.mm(a, b, out=out)
        best = min(best, now(device) - t)
    return 2 * n**3 * reps / best / 1e9


def main(argv=None) -> None:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    n = 8192 if args.device == "cuda" else 2048
    print(json.dumps({p: round(peak_gflops(p, n, device=args.device), 1) for p in ("fp32", "bf16")}))


if __name__ == "__main__":
    main()
