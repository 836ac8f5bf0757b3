"""Training-step throughput and memory of ADM on CPU.

The ImageNet-64 architecture (preset ``64x64_diffusion.pt``: 3 res blocks, mult 1,2,3,4, attention
at 32/16/8, learned variance, cosine schedule) at width 64 instead of 192, batch 8, float32: one
step is the L_hybrid loss (``guided_pipelines.losses``) forward + backward + AdamW update, with and
without gradient checkpointing. Each configuration runs in a fresh process so that its peak RSS
(``resource.getrusage``) is its own.

    python benchmarks/bench_training.py [--steps 3] [--width 64] [--batch 8] [--append]

``--append`` adds a section to benchmarks/RESULTS.md."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_one(checkpointing: bool, width: int, batch: int, steps: int, threads: int | None) -> dict:
    import torch

    from guided_pipelines.conversion import preset_model
    from guided_pipelines.losses import UniformSampler, diffusion_training_losses
    from guided_pipelines.models import ADMUNet2DModel
    from guided_pipelines.schedulers import ADMScheduler

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = {k: v for k, v in preset_model("64x64_diffusion.pt", device="meta").config.items() if not k.startswith("_")}
    config["model_channels"] = width
    model = ADMUNet2DModel(**config).train()
    if checkpointing:
        model.enable_gradient_checkpointing()
    scheduler = ADMScheduler(num_train_timesteps=1000, beta_schedule="cosine", variance_type="learned_range")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sampler = UniformSampler(1000)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, 64, 64, generator=gen) * 2 - 1
    y = torch.randint(0, 1000, (batch,), generator=gen)
    for p in model.parameters():  # allocate AdamW's moments before the baseline
        optimizer.state[p]["exp_avg"] = torch.zeros_like(p)
        optimizer.state[p]["exp_avg_sq"] = torch.zeros_like(p)
        optimizer.state[p]["step"] = torch.tensor(0.0)
    baseline = _rss_mib()

    def step():
        t, w = sampler.sample(batch, generator=gen)
        losses = diffusion_training_losses(model, scheduler, x, t, class_labels=y)
        loss = (losses["loss"] * w).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    step()  # warm-up (allocator, oneDNN kernels)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    median = sorted(times)[len(times) // 2]
    return {
        "gradient_checkpointing": checkpointing,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "step_s_median": median,
        "images_per_s": batch / median,
        "peak_rss_mib": peak,
        "step_rss_mib": peak - baseline,
        "threads": torch.get_num_threads(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration (after 1 warm-up)")
    parser.add_argument("--width", type=int, default=64, help="model_channels (the released model has 192)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    parser.add_argument("--one", choices=["on", "off"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        result = run_one(args.one == "on", args.width, args.batch, args.steps, args.threads)
        print(json.dumps(result))
        return 0
    results = []
    for flag in ("off", "on"):
        cmd = [sys.executable, os.path.abspath(__file__), "--one", flag, "--steps", str(args.steps),
               "--width", str(args.width), "--batch", str(args.batch)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    import torch

    lines = [
        f"## Training step (bench_training.py): ADM ImageNet-64 architecture at width {args.width}, "
        f"batch {args.batch}, CPU float32",
        "",
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {results[0]['threads']} torch threads, "
        f"load average {os.getloadavg()[0]:.1f} at the end (shared machine: slower than an idle one), "
        f"torch {torch.__version__}; {results[0]['params_m']:.1f}M parameters; L_hybrid forward + backward + AdamW; "
        f"median of {args.steps} steps after a warm-up; peak RSS from getrusage, step RSS = peak minus the "
        "RSS with model, inputs and AdamW state allocated.",
        "",
        "| gradient checkpointing | s / step | images / s | peak RSS (MiB) | step RSS (MiB) |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {'on' if r['gradient_checkpointing'] else 'off'} | {r['step_s_median']:.2f} | {r['images_per_s']:.2f} "
            f"| {r['peak_rss_mib']:.0f} | {r['step_rss_mib']:.0f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.append:
        path = os.path.join(HERE, "RESULTS.md")
        with open(path, "a") as f:
            f.write("\n" + text)
        print(f"appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
