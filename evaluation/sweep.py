#!/usr/bin/env python
"""Guidance sweep: generate and evaluate samples over classifier scales, then plot the trade-off.

    accelerate launch evaluation/sweep.py --pipeline DIR_OR_REPO --ref-batch VIRTUAL_imagenet128_labeled.npz \\
        --scales 0,0.5,1,2,4,10 --num-samples 10000 --out-dir sweep/ [--respacing 250] [--inception-weights W]

For each scale s, ``OUT_DIR/samples_s{s}.npz`` is generated (resumable, see
``guided_pipelines/generation.py``) and evaluated against the reference batch (IS, FID, sFID,
precision, recall, FID_inf; ``guided_pipelines/evaluator.py``). Results accumulate in
``OUT_DIR/sweep.json`` -- a rerun skips finished scales -- and ``OUT_DIR/sweep.png`` plots FID / sFID,
IS, precision and recall against the scale, as Figure 4 of Dhariwal & Nichol 2021 (larger scales trade
recall for precision and IS). With fewer than 50k samples compare FID_inf across scales, not FID."""

import argparse
import json
import os
import sys

from guided_pipelines import evaluator, generation


def scale_tag(scale: float) -> str:
    return f"{scale:g}".replace("-", "m")


def plot_sweep(results: dict, path: str) -> str:
    """Plot metrics against classifier scale (keys of ``results`` are scales as strings)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = sorted(results, key=float)
    x = [float(s) for s in scales]

    def series(key):
        return [results[s].get(key) if results[s].get(key) is not None else float("nan") for s in scales]

    fig, axes = plt.subplots(2, 2, figsize=(9, 7), constrained_layout=True)
    panels = [
        (axes[0, 0], [("fid", "FID"), ("sfid", "sFID"), ("fid_infinity", "FID$_\\infty$")], "lower is better"),
        (axes[0, 1], [("inception_score", "Inception Score")], "higher is better"),
        (axes[1, 0], [("precision", "Precision")], "fidelity"),
        (axes[1, 1], [("recall", "Recall")], "diversity"),
    ]
    for ax, keys, note in panels:
        for key, label in keys:
            ax.plot(x, series(key), marker="o", label=label)
        ax.set_xlabel("classifier scale")
        ax.set_title(f"{' / '.join(label for _, label in keys)} ({note})", fontsize=10)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend()
    n = {results[s].get("num_samples") for s in scales}
    fig.suptitle(f"Classifier guidance sweep ({', '.join(str(v) for v in sorted(n, key=str))} samples per scale)")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def generation_args(args, scale: float, out: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    generation.add_arguments(parser)
    ns = parser.parse_args(["--pipeline", args.pipeline, "--out", out])
    ns.num_samples = args.num_samples
    ns.batch_size = args.batch_size
    ns.seed = args.seed
    ns.classifier_scale = scale
    ns.respacing = args.respacing
    ns.steps = args.steps
    ns.use_ddim = args.use_ddim
    ns.eta = args.eta
    ns.no_progress = args.no_progress
    return ns


def run_sweep(args, log=print) -> dict | None:
    """Generate + evaluate every scale not yet in ``OUT_DIR/sweep.json``; returns the results (main
    process) or None (other processes)."""
    from accelerate import PartialState

    scales = [float(s) for s in args.scales.split(",")]
    if any(s < 0 for s in scales):
        raise ValueError(f"classifier scales must be >= 0, got {args.scales}")
    os.makedirs(args.out_dir, exist_ok=True)
    results_path = os.path.join(args.out_dir, "sweep.json")
    results = {}
    if os.path.isfile(results_path):
        with open(results_path) as f:
            results = json.load(f)
    state = PartialState()
    for scale in scales:
        key = f"{scale:g}"
        if key in results and results[key].get("num_samples") == args.num_samples:
            continue
        out = os.path.join(args.out_dir, f"samples_s{scale_tag(scale)}.npz")
        generation.generate(generation_args(args, scale, out), log=log)
        state.wait_for_everyone()
        if state.is_main_process:
            res = evaluator.evaluate(
                args.ref_batch,
                out,
                inception_weights=args.inception_weights,
                batch_size=args.eval_batch_size,
                device=args.eval_device,
                cache_dir=None if args.no_cache else (args.cache_dir or evaluator.default_cache_dir()),
                fid_method=args.fid_method,
                infinity_points=args.infinity_points,
                log=log,
            )
            res["classifier_scale"] = scale
            results[key] = res
            log(f"scale {key}: " + evaluator.format_report(res).replace("\n", "; "))
            tmp = f"{results_path}.tmp"
            with open(tmp, "w") as f:
                json.dump(results, f, indent=2)
            os.replace(tmp, results_path)
        state.wait_for_everyone()
    if not state.is_main_process:
        return None
    plot_sweep({k: v for k, v in results.items() if float(k) in scales}, os.path.join(args.out_dir, "sweep.png"))
    log(f"results: {results_path}; plot: {os.path.join(args.out_dir, 'sweep.png')}")
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True)
    parser.add_argument("--ref-batch", required=True, help="reference batch .npz of the same resolution")
    parser.add_argument("--scales", default="0,0.5,1,2,4,10", help="comma-separated classifier scales")
    parser.add_argument("--num-samples", type=int, default=10_000)
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--respacing", default=None)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--use-ddim", action="store_true")
    parser.add_argument("--eta", type=float, default=0.0)
    parser.add_argument("--inception-weights", default=None)
    parser.add_argument("--eval-batch-size", type=int, default=64)
    parser.add_argument("--eval-device", default=None)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--no-cache", action="store_true")
    parser.add_argument("--fid-method", choices=("sqrtm", "eigh"), default="sqrtm")
    parser.add_argument("--infinity-points", type=int, default=15)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        run_sweep(args, log=lambda msg: print(msg, file=sys.stderr))
    except (ValueError, FileNotFoundError) as err:
        print(f"sweep: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
