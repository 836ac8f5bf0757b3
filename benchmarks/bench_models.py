"""Forward-pass benchmark of the ADM UNet on CPU: ImageNet-64 architecture (the ``64x64_diffusion.pt``
flags with ``num_channels=64``), batch 8, float32, 2 threads.

Reports the wall-clock forward time (median and minimum over ``--runs``) and, from ``torch.profiler``,
how much of a forward is spent in the compute kernels. Kernel ops (their *self* CPU time, so wrappers
such as ``aten::conv2d``/``aten::_convolution``/``aten::linear`` are not double-counted):

- convolution: ``aten::mkldnn_convolution`` (or the slow/NNPACK fallbacks);
- matrix products: ``aten::addmm``, ``aten::mm``, ``aten::bmm``, ``aten::baddbmm``;
- attention: ``aten::_scaled_dot_product_flash_attention_for_cpu`` (the fused kernel: its softmax
  counts as kernel time; an unfused ``aten::_softmax`` would not).

Everything else (GroupNorm, SiLU, adds, concatenation, resampling, copies, Python between ops) is
overhead. Goal: forward time ≤ 1.15 × kernel time.

On a shared machine other processes stretch some ops (with 2 threads, a parallel op waits for its
descheduled second thread). The profiled figures are therefore also given as a *per-op minimum*: every
forward runs the same op sequence, so each op's time is taken as its minimum over the profiled runs,
and the Python time between ops likewise; their sum estimates an undisturbed forward. The process
CPU time (all threads) is hardly affected by other load; run with ``OMP_WAIT_POLICY=PASSIVE`` so that
it does not count threads spinning while they wait.

    .venv/bin/python benchmarks/bench_models.py [--runs 9] [--profiled-runs 5] [--channels-last] [--table]
"""

import argparse
import os
import platform
import statistics
import time
from collections import defaultdict

import torch

from guided_pipelines.conversion import PRESETS, kwargs_from_flags, model_from_original

KERNEL_OPS = {
    "aten::mkldnn_convolution",
    "aten::_slow_conv2d_forward",
    "aten::thnn_conv2d",
    "aten::_nnpack_spatial_convolution",
    "aten::addmm",
    "aten::mm",
    "aten::bmm",
    "aten::baddbmm",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
}


def build_model():
    flags = dict(PRESETS["64x64_diffusion.pt"]["flags"], num_channels=64)
    return model_from_original("unet", None, **kwargs_from_flags("unet", flags))


def profile_once(forward):
    """``(ops, gap_us)``: the forward's ops in order as (name, self µs), and the time outside any op."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        forward()
        wall_us = (time.perf_counter() - start) * 1e6
    events = sorted((e for e in prof.events() if e.name.startswith("aten::")), key=lambda e: e.time_range.start)
    ops = [(e.name, e.self_cpu_time_total) for e in events]
    top_level = sum(e.cpu_time_total for e in events if e.cpu_parent is None)
    return ops, max(wall_us - top_level, 0.0)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=9, help="timed forwards (after 2 warm-up runs)")
    parser.add_argument("--profiled-runs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--channels-last", action="store_true", help="model and input in channels-last memory format")
    parser.add_argument("--table", action="store_true", help="list the overhead ops (per-op minimum estimate)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model()
    x = torch.randn(args.batch, 3, 64, 64)
    t = torch.randint(0, 1000, (args.batch,))
    y = torch.randint(0, 1000, (args.batch,))
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def forward():
        with torch.inference_mode():
            return model(x, t, class_labels=y).sample

    for _ in range(2):
        forward()
    times, cpu_times = [], []
    for _ in range(args.runs):
        start, cpu_start = time.perf_counter(), time.process_time()
        forward()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)

    runs = [profile_once(forward) for _ in range(args.profiled_runs)]
    sequences = [[name for name, _ in ops] for ops, _ in runs]
    if any(seq != sequences[0] for seq in sequences):
        raise RuntimeError("the forward ran different op sequences; cannot take per-op minima")
    names = sequences[0]
    per_op = [min(ops[j][1] for ops, _ in runs) for j in range(len(names))]
    gap = min(g for _, g in runs)
    kernel = sum(us for name, us in zip(names, per_op) if name in KERNEL_OPS) / 1e3
    estimate = (sum(per_op) + gap) / 1e3
    profiled = [sum(us for _, us in ops) / 1e3 + g / 1e3 for ops, g in runs]

    median, best = statistics.median(times) * 1e3, min(times) * 1e3
    params = sum(p.numel() for p in model.parameters())
    layout = "channels-last" if args.channels_last else "NCHW"
    print(f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, {args.threads} threads, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"model: 64x64_diffusion flags, num_channels=64 ({params / 1e6:.1f}M params), batch {args.batch}, "
          f"float32, {layout}")
    print(f"forward wall time:        median {median:8.1f} ms   min {best:8.1f} ms   ({args.runs} runs)")
    print(f"forward CPU time:         median {statistics.median(cpu_times) * 1e3:8.1f} ms   (all threads)")
    print(f"profiled forward:         median {statistics.median(profiled):8.1f} ms   ({args.profiled_runs} runs)")
    print(f"per-op minimum estimate:  total  {estimate:8.1f} ms   kernels {kernel:8.1f} ms   "
          f"total / kernels {estimate / kernel:.3f}  (goal <= 1.15)")
    print(f"wall / kernels:           median {median / kernel:.3f}   min {best / kernel:.3f}")
    if args.table:
        totals = defaultdict(float)
        for name, us in zip(names, per_op):
            totals[name] += us
        totals["(between ops)"] = gap
        print(f"{'op (per-op minimum estimate)':52s} {'ms':>8s} {'share':>7s}")
        for name, us in sorted(totals.items(), key=lambda item: -item[1])[:20]:
            kind = " [kernel]" if name in KERNEL_OPS else ""
            print(f"{name + kind:52s} {us / 1e3:8.1f} {100 * us / 1e3 / estimate:6.1f}%")


if __name__ == "__main__":
    main()
