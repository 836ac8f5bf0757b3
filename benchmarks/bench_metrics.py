#!/usr/bin/env python
"""Seconds for the ADM evaluator's precision / recall (k = 3) on N x N x 2048 features.

    python benchmarks/bench_metrics.py                     # 10k x 10k x 2048, CPU with 2 threads (+ CUDA if present)
    python benchmarks/bench_metrics.py --append-results    # also append a "bench_metrics" section to RESULTS.md

Features are random non-negative vectors with the scale of Inception pool features (squared norms
~500, inside float16's range, so the "adm" mode takes its float16 path as on real features). The
figure is the median wall time of ``--repeats`` full ``precision_recall`` calls (both k-NN radii
passes and the cross pass: three N x N distance blocks)."""

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from guided_pipelines.metrics import precision_recall  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def features(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.abs(rng.normal(0.0, 0.5, (n, dim))).astype(np.float32)


def bench(ref, sample, device: str, mode: str, repeats: int) -> tuple[float, list[float], tuple[float, float]]:
    times = []
    result = None
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = precision_recall(ref, sample, k=3, mode=mode, device=device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, (result.precision, result.recall)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, default=10_000, help="features per set (default 10000)")
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.add_argument("--modes", default="adm", help="comma-separated: adm,float32,float64")
    parser.add_argument("--devices", default=None, help="comma-separated (default: cpu, plus cuda when available)")
    parser.add_argument("--append-results", action="store_true", help=f"append a section to {RESULTS}")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    ref, sample = features(args.num, args.dim, 0), features(args.num, args.dim, 1)
    rows = []
    for device in devices:
        for mode in args.modes.split(","):
            if device.startswith("cuda"):
                precision_recall(ref[:2000], sample[:2000], mode=mode, device=device)  # warm-up
            med, times, (p, r) = bench(ref, sample, device, mode, args.repeats)
            name = torch.cuda.get_device_name() if device.startswith("cuda") else f"{platform.processor() or 'cpu'}, {args.threads} threads"
            rows.append((device, name, mode, med, times, p, r))
            print(f"{device:5s} {mode:8s} median {med:7.2f} s  runs {[round(t, 2) for t in times]}  P={p:.4f} R={r:.4f}  ({name})")

    if args.append_results:
        lines = [
            "",
            "## bench_metrics",
            "",
            f"`python benchmarks/bench_metrics.py` ({datetime.date.today().isoformat()}, torch {torch.__version__}): "
            f"precision / recall (k = 3, the ADM evaluator's manifold estimate) on {args.num:,} x {args.num:,} "
            f"features of dimension {args.dim}, median of {args.repeats} runs.",
            "",
            "| device | hardware | distances | median seconds | runs |",
            "|---|---|---|---|---|",
        ]
        for device, name, mode, med, times, _, _ in rows:
            lines.append(f"| {device} | {name} | {mode} | {med:.2f} | {', '.join(f'{t:.2f}' for t in times)} |")
        with open(RESULTS, "a") as f:
            f.write("\n".join(lines) + "\n")
        print(f"appended to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
