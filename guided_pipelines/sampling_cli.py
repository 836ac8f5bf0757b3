"""``guided-pipelines sample``: classifier-guided samples as a labelled image grid (the main job).

Defaults to the embedded Fashion-MNIST pipeline shipped with the package, when present."""

from __future__ import annotations

import math
import os

import torch

DEFAULT_PIPELINE = os.path.join(os.path.dirname(__file__), "default_pipeline")
SCHEDULERS = ("adm", "dpm++")


def add_arguments(parser) -> None:
    parser.add_argument("--pipeline", default=None, help="pipeline folder or Hub repo id (default: the embedded model)")
    parser.add_argument("--labels", nargs="+", default=None, help="class names or ids (default: one of each class)")
    parser.add_argument("--classifier-scale", type=float, default=None, help="guidance scale s (default: the pipeline's)")
    parser.add_argument("--steps", type=int, default=25, help="number of sampling steps (default 25)")
    parser.add_argument("--respacing", default=None, help="original respacing string, e.g. 250 or ddim25 (overrides --steps)")
    parser.add_argument("--use-ddim", action="store_true", help="DDIM (deterministic with --eta 0) instead of ancestral")
    parser.add_argument("--eta", type=float, default=0.0)
    parser.add_argument("--scheduler", choices=SCHEDULERS, default="adm", help="adm (exact) or dpm++ (DPM-Solver++)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="grid.png", help="output PNG (a labelled grid)")


def load_pipeline(path: str | None, device: str):
    from .pipelines import ClassifierGuidedPipeline

    if path is None:
        if not os.path.isfile(os.path.join(DEFAULT_PIPELINE, "model_index.json")):
            raise FileNotFoundError(
                f"no embedded default pipeline at {DEFAULT_PIPELINE}; pass --pipeline FOLDER_OR_REPO_ID "
                "(e.g. a folder written by 'guided-pipelines convert')"
            )
        path = DEFAULT_PIPELINE
    pipe = ClassifierGuidedPipeline.from_pretrained(path)
    return pipe.to(device)


def label_grid(images, captions, columns: int | None = None, scale: int | None = None):
    """Images (PIL) with a caption under each, laid out in a grid."""
    from PIL import Image, ImageDraw, ImageFont

    n = len(images)
    columns = columns or min(n, 8)
    rows = math.ceil(n / columns)
    w, h = images[0].size
    scale = scale or max(1, 96 // max(w, h))
    cell_w, cell_h, text_h = w * scale, h * scale, 14
    grid = Image.new("RGB", (columns * (cell_w + 4) + 4, rows * (cell_h + text_h + 4) + 4), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for i, (image, caption) in enumerate(zip(images, captions)):
        x = 4 + (i % columns) * (cell_w + 4)
        y = 4 + (i // columns) * (cell_h + text_h + 4)
        grid.paste(image.convert("RGB").resize((cell_w, cell_h), Image.NEAREST), (x, y))
        max_chars = max(4, cell_w // 6)
        draw.text((x, y + cell_h + 1), caption[:max_chars], fill="black", font=font)
    return grid


def run(args) -> int:
    pipe = load_pipeline(args.pipeline, args.device)
    if args.scheduler == "dpm++":
        if args.respacing or args.use_ddim:
            raise ValueError("--respacing/--use-ddim apply to the adm scheduler; with dpm++ use --steps")
        pipe.scheduler = pipe.scheduler.dpm_solver()
    labels = args.labels
    if labels is None:
        if pipe.num_classes is None:
            raise ValueError("this pipeline is unconditional; it has no classes to show")
        labels = list(range(pipe.num_classes))
    ids = pipe.get_label_ids(labels)
    scale = args.classifier_scale
    if scale is None:
        recommended = pipe.config.get("recommended_classifier_scale")
        scale = (1.0 if recommended is None else float(recommended)) if pipe.classifier is not None else 0.0
    generator = [torch.Generator().manual_seed(args.seed * 100003 + i) for i in range(len(ids))]
    out = pipe(
        class_labels=ids,
        classifier_scale=scale,
        num_inference_steps=args.steps,
        respacing=args.respacing,
        use_ddim=args.use_ddim,
        eta=args.eta,
        generator=generator,
    )
    names = pipe.id2label
    captions = [names.get(i, str(i)).split(",")[0] for i in ids]
    folder = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(folder, exist_ok=True)
    tmp = args.out + ".tmp.png"
    label_grid(out.images, captions).save(tmp)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}: {len(ids)} samples, classifier scale {scale}")
    return 0
