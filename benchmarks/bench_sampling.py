"""Seconds for 3 classifier-guided DDIM steps (respacing "ddim3", scale 1) with the ImageNet-64 UNet
architecture at width 64 and the 64×64 classifier at width 64 (depth 2), batch 8, float32, on CPU.

    .venv/bin/python benchmarks/bench_sampling.py [--repeats 5] [--threads 2]

Prints the median wall time of the whole pipeline call and the split between the UNet forward and the
classifier forward+backward (median over steps)."""

import argparse
import statistics
import time

import torch

from guided_pipelines import ADMScheduler, ClassifierGuidedPipeline
from guided_pipelines.conversion import PRESETS, _build, kwargs_from_flags


def build(seed: int = 0):
    torch.manual_seed(seed)
    unet_kwargs = kwargs_from_flags("unet", dict(PRESETS["64x64_diffusion.pt"]["flags"], num_channels=64))
    clf_kwargs = kwargs_from_flags(
        "classifier", dict(PRESETS["64x64_classifier.pt"]["flags"], classifier_width=64, classifier_depth=2)
    )
    unet = _build("unet", unet_kwargs).eval()
    classifier = _build("classifier", clf_kwargs).eval()
    with torch.no_grad():  # fresh models have zero output layers; random weights exercise every op
        for p in list(unet.parameters()) + list(classifier.parameters()):
            p.normal_(0, 0.02)
    pipe = ClassifierGuidedPipeline(unet=unet, scheduler=ADMScheduler(beta_schedule="cosine"), classifier=classifier)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = build()
    labels = list(range(args.batch))
    timings = {"unet": [], "classifier": []}

    def timed(module, key):
        starts = []
        module.register_forward_pre_hook(lambda *a: starts.append(time.perf_counter()))
        module.register_forward_hook(lambda *a: timings[key].append(time.perf_counter() - starts.pop()))

    timed(pipe.unet, "unet")
    run = lambda: pipe(class_labels=labels, classifier_scale=1.0, respacing="ddim3", use_ddim=True,
                       generator=torch.Generator().manual_seed(0), output_type="latent")
    run()  # warm-up
    timings = {"unet": [], "classifier": []}
    totals = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        run()
        totals.append(time.perf_counter() - start)
    unet_step = statistics.median(timings["unet"])
    total = statistics.median(totals)
    print(f"threads={args.threads} batch={args.batch} torch={torch.__version__}")
    print(f"3 guided DDIM steps: median {total:.3f} s over {args.repeats} runs (min {min(totals):.3f} s)")
    print(f"  unet forward per step: {unet_step:.3f} s; classifier forward+backward and the rest per step: "
          f"{total / 3 - unet_step:.3f} s")
    print(f"  ratio to the original implementation's 8.2 s: {total / 8.2:.2f}")


if __name__ == "__main__":
    main()
