"""Speed of the embedded Fashion-MNIST default pipeline: 16 guided images, 25 DDIM steps, at the
recommended classifier scale (issue goal: ≤ 20 s on 2 CPU cores). Median (and min) of --repeats runs
after one warm-up call.

    .venv/bin/python benchmarks/bench_default.py --threads 2 --repeats 5
"""

import argparse
import statistics
import time

import torch

from guided_pipelines import ClassifierGuidedPipeline
from guided_pipelines.sampling_cli import DEFAULT_PIPELINE


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--respacing", default="ddim25")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pipe = ClassifierGuidedPipeline.from_pretrained(DEFAULT_PIPELINE)
    pipe.set_progress_bar_config(disable=True)
    scale = pipe.config.recommended_classifier_scale
    labels = [i % 10 for i in range(args.batch)]

    def run():
        return pipe(class_labels=labels, classifier_scale=scale, respacing=args.respacing,
                    use_ddim=args.respacing.startswith("ddim"), generator=torch.Generator().manual_seed(0),
                    output_type="np")

    run()  # warm-up
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    print(f"{args.batch} images, {args.respacing}, scale {scale:g}, {args.threads} threads: "
          f"median {statistics.median(times):.2f} s, min {min(times):.2f} s ({args.repeats} runs)")


if __name__ == "__main__":
    main()
