"""``guided-pipelines generate``: resumable, multi-process sample generation to the original ``.npz``.

    accelerate launch evaluation/generate.py --pipeline DIR_OR_REPO --num-samples 50000 --out samples.npz \\
        --classifier-scale 1.0 --respacing 250
    torchrun --nproc_per_node 4 evaluation/generate.py ...      # several CPU processes (gloo)

Writes what the original ``scripts/classifier_sample.py`` writes -- ``arr_0`` uint8 NHWC images
(``((x + 1) * 127.5).clamp(0, 255).to(torch.uint8)``) and ``arr_1`` class labels -- ready for
``guided-pipelines evaluate``. Differences from the original that make 50k-sample runs robust:

* sample ``i``'s label, x_T and the noise of every sampling step come from its own generator seeded
  by ``(seed, i)``, and the samples are cut into fixed batches ``[b * B, (b + 1) * B)`` handed out
  round-robin to the processes: the file does not depend on the number of processes;
* each finished batch is written to ``OUT.parts/batch_XXXXXX.npz`` atomically (temporary file +
  ``os.replace``), so a killed run restarts where it stopped, without a missing or duplicated index;
* the final file is assembled by streaming the shards (memory of one batch) and written atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import zipfile

import numpy as np
import torch

MANIFEST = "manifest.json"
CONFIG_KEYS = (
    "pipeline",
    "num_samples",
    "batch_size",
    "seed",
    "classifier_scale",
    "respacing",
    "num_inference_steps",
    "use_ddim",
    "eta",
    "num_classes",
    "image_shape",
)


def sample_seed(seed: int, index: int) -> int:
    """A 63-bit seed for sample ``index`` of a run with ``seed`` (numpy SeedSequence hashing, so
    neighbouring indices get unrelated streams)."""
    state = np.random.SeedSequence(entropy=int(seed), spawn_key=(int(index),)).generate_state(2, np.uint32)
    return int((int(state[0]) << 32 | int(state[1])) & ((1 << 63) - 1))


class SampleNoise:
    """Labels, x_T and per-step noise of samples ``indices``; each sample draws from its own CPU
    generator in a fixed order (label, x_T, then step 0, 1, ...), so the values depend only on
    ``(seed, index)`` -- not on the batch, the process or the device."""

    def __init__(self, seed: int, indices, shape: tuple, num_classes: int | None):
        self.shape = tuple(shape)
        self.generators = [torch.Generator().manual_seed(sample_seed(seed, i)) for i in indices]
        self.labels = None
        if num_classes is not None:
            self.labels = torch.cat([torch.randint(0, num_classes, (1,), generator=g) for g in self.generators])
        self.x_T = self._draw()
        self._step = 0

    def _draw(self) -> torch.Tensor:
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.generators])

    def step_noise(self, i: int, t=None) -> torch.Tensor:
        """The pipeline's ``step_noise`` callable: noise of sampling step ``i`` (called in order)."""
        if i != self._step:
            raise RuntimeError(f"step noise requested for step {i}, expected step {self._step}")
        self._step += 1
        return self._draw()


def batch_ranges(num_samples: int, batch_size: int):
    return [(start, min(start + batch_size, num_samples)) for start in range(0, num_samples, batch_size)]


def shard_path(parts_dir: str, batch: int) -> str:
    return os.path.join(parts_dir, f"batch_{batch:06d}.npz")


def _atomic_savez(path: str, **arrays) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def shard_is_complete(path: str, start: int, stop: int) -> bool:
    """True when ``path`` is a readable shard holding exactly indices ``start .. stop - 1``."""
    if not os.path.isfile(path):
        return False
    try:
        with np.load(path) as data:
            return np.array_equal(data["indices"], np.arange(start, stop)) and len(data["arr_0"]) == stop - start
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return False


def _write_npz_streaming(path: str, shards: list[str], num_samples: int, image_shape: tuple, with_labels: bool) -> None:
    """Concatenate the shards' ``arr_0`` (and ``arr_1``) into ``path`` without holding all images in
    memory: the ``.npy`` members are written header first, then shard by shard."""
    tmp = f"{path}.{os.getpid()}.tmp"
    members = [("arr_0", np.uint8, (num_samples, *image_shape))]
    if with_labels:
        members.append(("arr_1", np.int64, (num_samples,)))
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, dtype, shape in members:
            with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
                np.lib.format.write_array_header_2_0(f, header)
                written = 0
                for shard in shards:
                    with np.load(shard) as data:
                        arr = np.ascontiguousarray(data[name], dtype=dtype)
                    f.write(arr.tobytes())
                    written += len(arr)
                if written != shape[0]:
                    raise RuntimeError(f"assembled {written} rows of {name}, expected {shape[0]}")
    os.replace(tmp, path)


def _config(args, pipe) -> dict:
    unet = pipe.unet.config
    num_classes = pipe.num_classes
    return {
        "pipeline": args.pipeline,
        "num_samples": args.num_samples,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "classifier_scale": args.classifier_scale,
        "respacing": args.respacing,
        "num_inference_steps": args.steps,
        "use_ddim": bool(args.use_ddim),
        "eta": args.eta,
        "num_classes": num_classes,
        "image_shape": [unet.sample_size, unet.sample_size, unet.in_channels],
    }


def _check_manifest(parts_dir: str, config: dict, is_main: bool) -> None:
    path = os.path.join(parts_dir, MANIFEST)
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        diff = {k: (saved.get(k), config.get(k)) for k in CONFIG_KEYS if saved.get(k) != config.get(k)}
        if diff:
            details = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise ValueError(
                f"{parts_dir} holds an unfinished run with other settings ({details}); resume it with the same "
                f"arguments, or delete {parts_dir} (or choose another --out) to start a new run"
            )
    elif is_main:
        os.makedirs(parts_dir, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(config, f, indent=2)
        os.replace(tmp, path)


def resolve_classifier_scale(pipe, scale: float | None) -> float:
    """``scale`` if given; else the pipeline's recommended scale (1.0 if it has none); 0 without a classifier."""
    if scale is not None:
        return float(scale)
    if pipe.classifier is None:
        return 0.0
    recommended = pipe.config.get("recommended_classifier_scale")
    return float(recommended) if recommended is not None else 1.0


def generate(args, log=print) -> str | None:
    """Run (or resume) the generation described by ``args``; returns the output path once complete,
    ``None`` when this invocation stopped early (``--max-batches``)."""
    from accelerate import PartialState
    from tqdm.auto import tqdm

    import guided_pipelines.models  # noqa: F401  (registers the model classes named in model_index.json)
    from guided_pipelines.pipelines import ClassifierGuidedPipeline, to_uint8

    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not args.out.endswith(".npz"):
        raise ValueError(f"--out {args.out!r} must end in .npz (the evaluator's input format)")
    # cpu=True lets accelerate form a gloo process group under torchrun on machines without CUDA.
    state = PartialState(cpu=args.device == "cpu" or not torch.cuda.is_available())
    is_main = state.is_main_process
    parts_dir = args.parts_dir or f"{args.out}.parts"
    if os.path.isfile(args.out) and not args.overwrite and not os.path.isdir(parts_dir):
        if is_main:
            log(f"{args.out} already exists; nothing to do (pass --overwrite to generate it again)")
        return args.out

    pipe = ClassifierGuidedPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(state.device if args.device is None else args.device)
    args.classifier_scale = resolve_classifier_scale(pipe, args.classifier_scale)
    config = _config(args, pipe)
    if args.overwrite and is_main and os.path.isdir(parts_dir) and os.path.isfile(os.path.join(parts_dir, MANIFEST)):
        with open(os.path.join(parts_dir, MANIFEST)) as f:
            if json.load(f) != config:
                shutil.rmtree(parts_dir)
    state.wait_for_everyone()
    _check_manifest(parts_dir, config, is_main)
    state.wait_for_everyone()

    ranges = batch_ranges(args.num_samples, args.batch_size)
    mine = [b for b in range(len(ranges)) if b % state.num_processes == state.process_index]
    todo = [b for b in mine if not shard_is_complete(shard_path(parts_dir, b), *ranges[b])]
    if is_main:
        log(
            f"{args.num_samples} samples in {len(ranges)} batches of {args.batch_size} on {state.num_processes} "
            f"process(es); classifier scale {args.classifier_scale:g}; shards in {parts_dir}"
        )
    if is_main and len(todo) < len(mine):
        log(f"resuming: {len(mine) - len(todo)} of this process's {len(mine)} batches are already done")
    if args.max_batches is not None:
        todo = todo[: args.max_batches]
    shape = (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    with tqdm(
        total=sum(ranges[b][1] - ranges[b][0] for b in todo) * state.num_processes,
        desc=f"generating {os.path.basename(args.out)}",
        unit="img",
        disable=not is_main or args.no_progress,
        file=sys.stderr,
    ) as bar:
        for b in todo:
            start, stop = ranges[b]
            noise = SampleNoise(args.seed, range(start, stop), shape, pipe.num_classes)
            out = pipe(
                class_labels=noise.labels,
                num_images=stop - start,
                classifier_scale=args.classifier_scale,
                num_inference_steps=args.steps,
                respacing=args.respacing,
                use_ddim=args.use_ddim,
                eta=args.eta,
                latents=noise.x_T,
                step_noise=noise.step_noise,
                output_type="latent",
            )
            arrays = {"arr_0": to_uint8(out.images).cpu().numpy(), "indices": np.arange(start, stop)}
            if noise.labels is not None:
                arrays["arr_1"] = noise.labels.numpy().astype(np.int64)
            _atomic_savez(shard_path(parts_dir, b), **arrays)
            bar.update((stop - start) * state.num_processes)
    state.wait_for_everyone()
    if not is_main:
        return None
    missing = [b for b in range(len(ranges)) if not shard_is_complete(shard_path(parts_dir, b), *ranges[b])]
    if missing:
        log(f"{len(ranges) - len(missing)} of {len(ranges)} batches done; run the same command again to continue")
        return None
    image_shape = (pipe.unet.config.sample_size, pipe.unet.config.sample_size, pipe.unet.config.in_channels)
    shards = [shard_path(parts_dir, b) for b in range(len(ranges))]
    _write_npz_streaming(args.out, shards, args.num_samples, image_shape, with_labels=pipe.num_classes is not None)
    if not args.keep_parts:
        shutil.rmtree(parts_dir, ignore_errors=True)
    log(f"wrote {args.num_samples} samples to {args.out}")
    return args.out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pipeline", required=True, help="ClassifierGuidedPipeline folder or Hub repo id")
    parser.add_argument("--num-samples", type=int, default=50_000, help="number of samples (default 50000, as the paper)")
    parser.add_argument("--out", required=True, help="output .npz (arr_0 uint8 NHWC images, arr_1 labels)")
    parser.add_argument("--batch-size", type=int, default=16, help="samples per batch and per shard (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="run seed; sample i's randomness comes from (seed, i)")
    parser.add_argument(
        "--classifier-scale", type=float, default=None, help="guidance scale s (default: the pipeline's recommended scale)"
    )
    parser.add_argument("--respacing", default=None, help="original respacing string, e.g. 250 or ddim25")
    parser.add_argument("--steps", type=int, default=250, help="sampling steps when --respacing is not given (default 250)")
    parser.add_argument("--use-ddim", action="store_true", help="DDIM sampling (with --respacing ddimN, as the paper)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0)")
    parser.add_argument("--device", default=None, help="torch device (default: this process's accelerate device)")
    parser.add_argument("--parts-dir", default=None, help="folder for the shards (default OUT.parts)")
    parser.add_argument("--keep-parts", action="store_true", help="keep the shards after writing OUT")
    parser.add_argument("--overwrite", action="store_true", help="regenerate OUT even if it exists")
    parser.add_argument("--max-batches", type=int, default=None, help="stop after this many batches per process (resume later)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    generate(args, log=lambda msg: print(msg, file=sys.stderr))
    return 0
