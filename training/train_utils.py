"""Shared machinery of ``train_diffusion.py`` and ``train_classifier.py``: YAML + flag parsing,
process-count–independent data order and randomness, float32 EMA, exact checkpoints with
rotation, non-finite step guard, metrics, pipeline folders and Hub upload.

Exactness rules (what makes a resumed run, and a run on W processes, equal to one uninterrupted
single-process run with the same global batch):

* the data stream is a function of (seed, step): every epoch is a seeded permutation, step ``s``
  takes stream positions ``[s·B, (s+1)·B)`` and process ``r`` the contiguous slice ``r·B/W …``;
* timesteps and noise of step ``s`` are drawn for the whole global batch from generators seeded by
  (seed, s), and each process takes its slice; crop/flip depend on (seed, epoch, index);
* the loss is the mean over the global batch (microbatch sums / local batch, averaged over
  processes by DDP), so the gradient does not depend on how the batch is split;
* a checkpoint holds model, optimizer, scaler, EMA, sampler history and the step; the data position
  is the step itself.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import difflib
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import time

import numpy as np
import torch

logger = logging.getLogger("guided_pipelines.training")

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# Test hook: "kill@K" SIGKILLs the process when step K is complete (after its checkpoint, if one is
# due); "nan@S1,S2,…" makes the loss of those (0-based) steps NaN once each. Used by tests/training.
FAULTS_ENV = "GUIDED_PIPELINES_TEST_FAULTS"
# guided_pipelines.inception.INCEPTION_URL, repeated so that flag parsing needs no torch-fidelity import
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)


# --------------------------------------------------------------------------------------------------
# Arguments


def str2bool(value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "y", "on"):
        return True
    if text in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def float_list(value) -> list[float]:
    if isinstance(value, (list, tuple)):
        return [float(v) for v in value]
    text = str(value).strip()
    if text in ("", "none", "None"):
        return []
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.9999,0.999, got {value!r}")


def parse_with_config(parser: argparse.ArgumentParser, argv=None, yaml_only: tuple = ()) -> argparse.Namespace:
    """Parse ``--config FILE.yaml`` first, use its keys as defaults, then parse the flags (flags win).

    YAML keys are flag names (``batch_size: 256``); keys in ``yaml_only`` (e.g. ``model``, a mapping)
    have no flag and are attached to the namespace as they are."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    extras = {key: None for key in yaml_only}
    if known.config:
        import yaml

        if not os.path.isfile(known.config):
            parser.error(f"--config {known.config!r} does not exist")
        with open(known.config) as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            parser.error(f"--config {known.config!r} must hold a mapping of option: value")
        dests = {a.dest: a for a in parser._actions}
        defaults = {}
        for key, value in values.items():
            dest = key.replace("-", "_")
            if dest in yaml_only:
                extras[dest] = value
            elif dest in dests and dest not in ("help", "config"):
                action = dests[dest]
                if action.type is not None and value is not None and not isinstance(value, (list, dict)):
                    try:
                        value = action.type(value) if not isinstance(value, bool) or action.type is str2bool else value
                    except (argparse.ArgumentTypeError, ValueError) as err:
                        parser.error(f"config key {key!r}: {err}")
                if action.choices is not None and value not in action.choices:
                    parser.error(f"config key {key!r}: {value!r} is not one of {', '.join(map(str, action.choices))}")
                defaults[dest] = value
            else:
                close = difflib.get_close_matches(dest, list(dests) + list(yaml_only), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                parser.error(f"unknown key {key!r} in {known.config}{hint}")
        parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    for key, value in extras.items():
        setattr(args, key, value)
    return args


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by both training scripts."""
    parser.add_argument("--config", help="YAML file of option: value (flags given on the command line win)")
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", help="Hub dataset id (ILSVRC/imagenet-1k), an image folder, or a save_to_disk folder")
    g.add_argument("--dataset_split", default="train")
    g.add_argument("--dataset_layout", default="auto", choices=["auto", "imagefolder", "prefix", "disk", "hub"])
    g.add_argument("--image_column", default=None)
    g.add_argument("--label_column", default=None)
    g.add_argument("--random_crop", type=str2bool, default=False, help="the original random-crop augmentation")
    g.add_argument("--random_flip", type=str2bool, default=True)
    g.add_argument("--streaming", type=str2bool, default=False, help="stream the dataset (exact resume by skipping)")
    g.add_argument("--shuffle_buffer_size", type=int, default=10000, help="streaming shuffle buffer")
    g.add_argument("--dataloader_num_workers", type=int, default=4)
    g.add_argument("--cache_dir", default=None)
    g = parser.add_argument_group("diffusion")
    g.add_argument("--num_train_timesteps", type=int, default=None, help="default: the preset's (1000)")
    g.add_argument("--beta_schedule", choices=["linear", "cosine"], default=None, help="default: the preset's")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=int, default=256, help="GLOBAL batch per optimizer step, all processes")
    g.add_argument("--microbatch", type=int, default=-1, help="per-process forward size (-1: the whole local batch)")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--weight_decay", type=float, default=0.0)
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--lr_anneal_steps", type=int, default=0, help="anneal lr linearly to 0 over this many steps (0: constant)")
    g.add_argument("--max_train_steps", type=int, default=None, help="default: lr_anneal_steps, else run until stopped")
    g.add_argument("--max_grad_norm", type=float, default=0.0, help="clip the gradient norm (0: no clipping)")
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    g.add_argument("--gradient_checkpointing", type=str2bool, default=False)
    g.add_argument("--seed", type=int, default=0)
    g = parser.add_argument_group("checkpoints and logging")
    g.add_argument("--output_dir", required=False)
    g.add_argument("--checkpointing_steps", type=int, default=10000)
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="keep only the newest N checkpoints")
    g.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder")
    g.add_argument("--max_bad_steps", type=int, default=5, help="consecutive non-finite steps before a restore")
    g.add_argument("--bad_step_lr_factor", type=float, default=0.5, help="lr multiplier applied at each restore")
    g.add_argument("--max_restores", type=int, default=3, help="give up after this many restores")
    g.add_argument("--report_to", choices=["tensorboard", "none"], default="tensorboard")
    g.add_argument("--logging_steps", type=int, default=1, help="tensorboard/metrics.jsonl interval")
    g.add_argument("--push_to_hub", type=str2bool, default=False)
    g.add_argument("--hub_model_id", default=None, help="user/name of the Hub repository")
    g.add_argument("--hub_private", type=str2bool, default=False)


def check_common_arguments(args, parser) -> None:
    """Reject bad values with the problem and the fix."""
    if not args.output_dir:
        parser.error("--output_dir is required (or output_dir: in the --config file)")
    if not args.dataset:
        parser.error("--dataset is required: a Hub id such as ILSVRC/imagenet-1k or a local image folder")
    if args.batch_size < 1:
        parser.error(f"--batch_size must be positive, got {args.batch_size}")
    if args.microbatch == 0 or args.microbatch < -1:
        parser.error(f"--microbatch must be positive or -1 (whole local batch), got {args.microbatch}")
    if args.lr <= 0 or not math.isfinite(args.lr):
        parser.error(f"--lr must be a positive number, got {args.lr}")
    if args.weight_decay < 0:
        parser.error(f"--weight_decay must be ≥ 0, got {args.weight_decay}")
    if args.lr_anneal_steps < 0:
        parser.error(f"--lr_anneal_steps must be ≥ 0, got {args.lr_anneal_steps}")
    if args.max_train_steps is None and args.lr_anneal_steps:
        args.max_train_steps = args.lr_anneal_steps
    if args.max_train_steps is not None and args.max_train_steps < 0:
        parser.error(f"--max_train_steps must be ≥ 0, got {args.max_train_steps}")
    if args.lr_anneal_steps and args.max_train_steps and args.max_train_steps > args.lr_anneal_steps:
        parser.error(
            f"--max_train_steps {args.max_train_steps} exceeds --lr_anneal_steps {args.lr_anneal_steps}: "
            "the lr would be 0 after the anneal; raise --lr_anneal_steps or lower --max_train_steps"
        )
    if args.checkpointing_steps < 1:
        parser.error(f"--checkpointing_steps must be positive, got {args.checkpointing_steps}")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        parser.error(f"--checkpoints_total_limit must be ≥ 1, got {args.checkpoints_total_limit}")
    if args.max_bad_steps < 1:
        parser.error(f"--max_bad_steps must be ≥ 1, got {args.max_bad_steps}")
    if not 0 < args.bad_step_lr_factor <= 1:
        parser.error(f"--bad_step_lr_factor must lie in (0, 1], got {args.bad_step_lr_factor}")
    if args.dataloader_num_workers < 0:
        parser.error(f"--dataloader_num_workers must be ≥ 0, got {args.dataloader_num_workers}")
    if args.logging_steps < 1:
        parser.error(f"--logging_steps must be positive, got {args.logging_steps}")
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id user/name")
    if args.max_grad_norm < 0:
        parser.error(f"--max_grad_norm must be ≥ 0 (0 disables clipping), got {args.max_grad_norm}")


def split_batch(args, world_size: int) -> tuple[int, int]:
    """(local batch, microbatch) for the global ``--batch_size`` on ``world_size`` processes."""
    if args.batch_size % world_size:
        raise ValueError(
            f"--batch_size {args.batch_size} (global) is not divisible by the {world_size} processes; "
            f"use a multiple of {world_size}"
        )
    local = args.batch_size // world_size
    micro = local if args.microbatch == -1 else args.microbatch
    if micro > local or local % micro:
        raise ValueError(
            f"--microbatch {args.microbatch} must divide the per-process batch {local} "
            f"(--batch_size {args.batch_size} / {world_size} processes)"
        )
    return local, micro


# --------------------------------------------------------------------------------------------------
# Data order and randomness


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (numpy SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(v) & 0xFFFFFFFF for v in values]).generate_state(1, np.uint64)[0] >> 1)


class StepSampler(torch.utils.data.Sampler):
    """This process's share of the global stream, from step ``start_step`` on, forever.

    Epoch ``e`` is a permutation seeded by (seed, e) (or the identity with ``shuffle=False``); the
    stream runs on across epoch boundaries. Step ``s`` covers stream positions ``[s·B, (s+1)·B)``
    of which process ``rank`` takes ``[s·B + rank·L, s·B + (rank+1)·L)`` with ``L = B / world``.
    Yields ``(index, epoch)`` pairs for :class:`guided_pipelines.data.ImageDataset`."""

    def __init__(self, num_samples: int, global_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 start_step: int = 0, shuffle: bool = True):
        if num_samples < 1:
            raise ValueError("the dataset is empty")
        self.n = num_samples
        self.global_batch = global_batch
        self.local = global_batch // world_size
        self.rank = rank
        self.seed = seed
        self.start_step = start_step
        self.shuffle = shuffle
        self._perm_epoch = None
        self._perm = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm_epoch != epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(mix_seed(self.seed, 17, epoch))
                self._perm = torch.randperm(self.n, generator=g)
            else:
                self._perm = torch.arange(self.n)
            self._perm_epoch = epoch
        return self._perm

    def __iter__(self):
        step = self.start_step
        while True:
            begin = step * self.global_batch + self.rank * self.local
            for pos in range(begin, begin + self.local):
                epoch = pos // self.n
                yield int(self._permutation(epoch)[pos % self.n]), epoch
            step += 1

    def __len__(self):  # infinite; DataLoader only needs this for its length hint
        return 2**62


def make_train_loader(dataset, args, accelerator, local_batch: int, start_step: int, stream_positions=None):
    """DataLoader yielding this process's local batch for each step from ``start_step`` on."""
    from guided_pipelines.data import StreamingImageDataset, collate

    workers = args.dataloader_num_workers
    if isinstance(dataset, StreamingImageDataset):
        dataset.start_positions = dict(stream_positions or {})
        return torch.utils.data.DataLoader(
            dataset, batch_size=local_batch, collate_fn=collate, num_workers=workers, persistent_workers=False
        )
    sampler = StepSampler(
        len(dataset), args.batch_size, accelerator.process_index, accelerator.num_processes, args.seed, start_step
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=local_batch,
        sampler=sampler,
        collate_fn=collate,
        num_workers=workers,
        persistent_workers=False,
        prefetch_factor=2 if workers else None,
    )


def step_generators(seed: int, step: int, device) -> tuple[torch.Generator, torch.Generator]:
    """(CPU generator for timesteps, device generator for noise) of global step ``step``; also
    seeds the global RNGs (dropout) per (seed, step, process) so a resumed step is replayed exactly."""
    t_gen = torch.Generator().manual_seed(mix_seed(seed, 1, step))
    n_gen = torch.Generator(device=device).manual_seed(mix_seed(seed, 2, step))
    return t_gen, n_gen


def seed_step(seed: int, step: int, rank: int) -> None:
    torch.manual_seed(mix_seed(seed, 3, step, rank))


def lr_at(step: int, base_lr: float, anneal_steps: int, scale: float = 1.0) -> float:
    """The original linear anneal: lr·(1 − step/anneal_steps), constant when anneal_steps = 0."""
    frac = step / anneal_steps if anneal_steps else 0.0
    return base_lr * scale * max(0.0, 1.0 - frac)


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# --------------------------------------------------------------------------------------------------
# State saved in checkpoints


class TrainState:
    """Step counter and run bookkeeping (saved with every checkpoint)."""

    def __init__(self):
        self.step = 0
        self.lr_scale = 1.0
        self.restores = 0
        self.bad_steps = 0
        self.consecutive_bad = 0
        self.skipped_images = 0
        self.images_seen = 0
        self.stream_positions = {}
        self.world_size = None
        self.global_batch = None

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class SamplerState:
    """Adapter that checkpoints a timestep sampler (loss history of the second-moment resampler)."""

    def __init__(self, sampler):
        self.sampler = sampler

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


class EMA:
    """Exponential moving averages θ̄ ← r·θ̄ + (1 − r)·θ at one or more rates, kept in float32
    (the original keeps its EMA in the master float32 parameters)."""

    def __init__(self, model: torch.nn.Module, rates: list[float]):
        for rate in rates:
            if not 0 < rate < 1:
                raise ValueError(f"EMA rates must lie in (0, 1), got {rate}")
        self.rates = list(rates)
        self.names = [name for name, _ in model.named_parameters()]
        self.shadow = {
            rate: [p.detach().to(torch.float32).clone() for p in model.parameters()] for rate in self.rates
        }

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        params = [p.detach().to(torch.float32) for p in model.parameters()]
        for rate, shadow in self.shadow.items():
            torch._foreach_mul_(shadow, rate)
            torch._foreach_add_(shadow, params, alpha=1 - rate)

    def copy_to(self, model: torch.nn.Module, rate: float) -> None:
        with torch.no_grad():
            for p, s in zip(model.parameters(), self.shadow[rate]):
                p.copy_(s.to(p.dtype))

    def state_dict(self) -> dict:
        return {"rates": self.rates, "names": self.names, "shadow": {str(r): s for r, s in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        if [float(r) for r in state["rates"]] != self.rates:
            raise ValueError(
                f"the checkpoint has EMA rates {state['rates']}, this run {self.rates}: resume with --ema_rates "
                f"{','.join(str(r) for r in state['rates'])}"
            )
        if list(state["names"]) != self.names:
            raise ValueError("the checkpoint's EMA parameters do not match this model's: different architecture")
        device = self.shadow[self.rates[0]][0].device if self.rates else "cpu"
        self.shadow = {float(r): [t.to(device) for t in s] for r, s in state["shadow"].items()}


# --------------------------------------------------------------------------------------------------
# Checkpoints


class CheckpointManager:
    """``OUTPUT/checkpoints/checkpoint-STEP`` folders written by ``accelerator.save_state`` into a
    temporary folder and renamed into place, so a killed run never leaves a half-written checkpoint
    that ``latest`` would pick; rotation keeps the newest ``limit``."""

    def __init__(self, output_dir: str, limit: int | None):
        self.root = os.path.join(output_dir, "checkpoints")
        self.limit = limit

    def list(self) -> list[tuple[int, str]]:
        if not os.path.isdir(self.root):
            return []
        found = []
        for name in os.listdir(self.root):
            m = CHECKPOINT_RE.match(name)
            if m:
                found.append((int(m.group(1)), os.path.join(self.root, name)))
        return sorted(found)

    def latest(self) -> str | None:
        found = self.list()
        return found[-1][1] if found else None

    def resolve(self, value: str | None) -> str | None:
        if not value:
            return None
        if value == "latest":
            return self.latest()
        if not os.path.isdir(value):
            raise FileNotFoundError(
                f"--resume_from_checkpoint {value!r} is not a folder; pass 'latest' or a checkpoint-STEP folder"
            )
        return value

    def save(self, accelerator, step: int, extra_files: dict | None = None) -> str:
        final = os.path.join(self.root, f"checkpoint-{step}")
        tmp = final + ".tmp"
        if accelerator.is_main_process:
            os.makedirs(self.root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(tmp, safe_serialization=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            for name, content in (extra_files or {}).items():
                with open(os.path.join(tmp, name), "w") as f:
                    f.write(content)
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
            self.rotate()
        accelerator.wait_for_everyone()
        return final

    def rotate(self) -> None:
        if self.limit is None:
            return
        found = self.list()
        for _, path in found[: max(0, len(found) - self.limit)]:
            logger.info("removing old checkpoint %s (--checkpoints_total_limit %d)", path, self.limit)
            shutil.rmtree(path, ignore_errors=True)


class Faults:
    """Test-only fault injection from ``$GUIDED_PIPELINES_TEST_FAULTS`` (see ``FAULTS_ENV``)."""

    def __init__(self):
        spec = os.environ.get(FAULTS_ENV, "")
        self.kill_after = None
        self.nan_steps = set()
        for part in filter(None, (p.strip() for p in spec.split(";"))):
            kind, _, where = part.partition("@")
            if kind == "kill":
                self.kill_after = int(where)
            elif kind == "nan":
                self.nan_steps = {int(s) for s in where.split(",") if s}
            else:
                raise ValueError(f"bad {FAULTS_ENV} entry {part!r}")

    def nan_now(self, step: int) -> bool:
        if step in self.nan_steps:
            self.nan_steps.discard(step)
            return True
        return False

    def after_step(self, step: int) -> None:
        if self.kill_after is not None and step == self.kill_after:
            logging.shutdown()
            os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------------------------------
# Metrics


class Metrics:
    """Per-step scalars to tensorboard (via accelerate) and ``OUTPUT/metrics.jsonl`` (main process).

    On resume, entries after the resumed step are dropped so the file reads as one clean run."""

    def __init__(self, accelerator, output_dir: str, resume_step: int | None):
        self.accelerator = accelerator
        self.path = os.path.join(output_dir, "metrics.jsonl")
        if accelerator.is_main_process:
            os.makedirs(output_dir, exist_ok=True)
            if resume_step is None:
                open(self.path, "w").close()
            else:
                self.truncate(resume_step)

    def truncate(self, step: int) -> None:
        if not self.accelerator.is_main_process or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        with open(self.path, "w") as f:
            f.writelines(keep)

    def log(self, values: dict, step: int, tb: bool = True) -> None:
        if tb and self.accelerator.trackers:
            self.accelerator.log({k: v for k, v in values.items() if isinstance(v, (int, float))}, step=step)
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")


def quartile_means(values: dict[str, torch.Tensor], timesteps: torch.Tensor, num_timesteps: int, prefix: str) -> dict:
    """Means of each term overall and per timestep quartile q = ⌊4t/T⌋ (the original log_loss_dict)."""
    out = {}
    quartile = (4 * timesteps.double() / num_timesteps).long().clamp(max=3)
    for key, v in values.items():
        v = v.double()
        out[f"{prefix}{key}"] = float(v.mean())
        for q in range(4):
            sel = quartile == q
            if sel.any():
                out[f"{prefix}{key}_q{q}"] = float(v[sel].mean())
    return out


def init_trackers(accelerator, name: str, args) -> None:
    if args.report_to == "none":
        return
    config = {k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v)) for k, v in vars(args).items() if v is not None}
    accelerator.init_trackers(name, config=config)


def grad_norm_(accelerator, model, max_norm: float) -> torch.Tensor:
    """Total gradient norm (after unscaling fp16 gradients); clips when ``max_norm`` > 0."""
    if max_norm > 0:
        return torch.as_tensor(accelerator.clip_grad_norm_(model.parameters(), max_norm)).float()
    accelerator.unscale_gradients()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])).float()


def restore_after_bad_steps(accelerator, ckpt: CheckpointManager, state: TrainState, args) -> None:
    """K consecutive non-finite steps: reload the last checkpoint and lower the lr."""
    path = ckpt.latest()
    if path is None:
        raise RuntimeError(
            f"{state.consecutive_bad} consecutive steps had a non-finite loss or gradient before the first "
            f"checkpoint; lower --lr (now {args.lr}) or use --mixed_precision no/bf16, or checkpoint earlier "
            "(--checkpointing_steps)"
        )
    if state.restores >= args.max_restores:
        raise RuntimeError(
            f"training diverged again after {state.restores} restores (--max_restores); lower --lr or check the data"
        )
    scale = state.lr_scale * args.bad_step_lr_factor
    restores, bad_total = state.restores + 1, state.bad_steps
    logger.warning(
        "%d consecutive non-finite steps at step %d: restoring %s and scaling the lr by %g (now ×%g)",
        state.consecutive_bad, state.step, path, args.bad_step_lr_factor, scale,
    )
    accelerator.load_state(path)
    state.lr_scale, state.restores, state.bad_steps, state.consecutive_bad = scale, restores, bad_total, 0


def check_resume_compatible(state: TrainState, args, world_size: int) -> None:
    if state.global_batch is not None and state.global_batch != args.batch_size:
        logger.warning(
            "the checkpoint was trained with --batch_size %s, this run uses %s: the data order changes",
            state.global_batch, args.batch_size,
        )


# --------------------------------------------------------------------------------------------------
# The training loop's shared steps (train_diffusion.py, train_classifier.py)


def make_accelerator(args):
    """The run's Accelerator (project and ``logs`` folder under ``--output_dir``), with logging set up."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, "logs")),
    )
    setup_logging(accelerator)
    return accelerator


def build_model_and_data(args, accelerator, kinds) -> tuple[str, torch.nn.Module, dict, object, int, int]:
    """Seed the initial weights (identical on every process), then resolve the model and its training data;
    returns (kind, model, preset_info, dataset, size, channels)."""
    from accelerate.utils import set_seed

    set_seed(args.seed)
    kind, kwargs, preset_info = resolve_model_spec(args, kinds)
    with accelerator.main_process_first():  # one process downloads/prepares, the others reuse the cache
        dataset, size, channels = resolve_classes(kind, kwargs, args, accelerator)
    model = instantiate(kind, kwargs, args.init_weights)
    return kind, model, preset_info, dataset, size, channels


def run_script(main, name: str) -> None:
    """``sys.exit(main())``, with the usage errors of a run printed as ``NAME: error: …`` (exit status 1)."""
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError, PermissionError) as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        sys.exit(1)


def make_optimizer(model, args) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        model.parameters(), lr=args.lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
        weight_decay=args.weight_decay,
    )


def resume_from_checkpoint(accelerator, ckpt: CheckpointManager, state: TrainState, args, world_size: int):
    """Load the checkpoint ``--resume_from_checkpoint`` names, if there is one; returns its path (or a falsy value)."""
    resume_path = ckpt.resolve(args.resume_from_checkpoint)
    if resume_path:
        accelerator.load_state(resume_path)
        check_resume_compatible(state, args, world_size)
        logger.info("resumed from %s at step %d", resume_path, state.step)
    return resume_path


def progress_bar(accelerator, max_steps: float, initial: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=None if math.isinf(max_steps) else max_steps, initial=initial,
                disable=not accelerator.is_local_main_process, desc=desc, dynamic_ncols=True)


def set_step_lr(optimizer, step: int, args, state: TrainState) -> float:
    """Set and return the learning rate of ``step`` (linear anneal, times the restore scale)."""
    lr = lr_at(step, args.lr, args.lr_anneal_steps, state.lr_scale)
    set_lr(optimizer, lr)
    return lr


def microbatch_sync(accelerator, model, last: bool):
    """Gradient sync only on the last microbatch of a step (always, on one process)."""
    return contextlib.nullcontext() if last or accelerator.num_processes == 1 else accelerator.no_sync(model)


def optimizer_step(optimizer, scaler_on: bool, loss_ok: bool, grad_ok: bool) -> tuple[bool, bool]:
    """Step unless the loss or gradient is non-finite, then zero the gradients; returns (applied, bad)."""
    if scaler_on:
        # fp16: the GradScaler skips overflowing steps and lowers the scale by itself.
        optimizer.step()
        applied = not optimizer.step_was_skipped and loss_ok
        bad = not loss_ok
    else:
        applied = loss_ok and grad_ok
        bad = not applied
        if applied:
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return applied, bad


def advance_state(state: TrainState, args, batch: dict, skipped: int, bad: bool) -> None:
    """Count a finished step: step, images, skipped images, stream positions, bad-step counters."""
    state.step += 1
    state.images_seen += args.batch_size
    state.skipped_images += skipped
    if "worker" in batch:
        state.stream_positions = dict(state.stream_positions)
        state.stream_positions[int(batch["worker"][-1])] = int(batch["index"].max())
    state.bad_steps += int(bad)
    state.consecutive_bad = state.consecutive_bad + 1 if bad else 0


def step_log_values(values: dict, grad_norm, lr: float, speed: float, state: TrainState, applied: bool) -> dict:
    """Add the per-step bookkeeping to the logged ``values`` (in place) and return them."""
    values.update(grad_norm=float(grad_norm), lr=lr, images_per_sec=speed, skipped_images=state.skipped_images,
                  bad_steps=state.bad_steps, step_applied=applied)
    return values


def warn_bad_step(state: TrainState, loss_ok: bool, args) -> None:
    logger.warning("step %d skipped: %s (consecutive: %d/%d)", state.step,
                   "non-finite loss" if not loss_ok else "non-finite gradient", state.consecutive_bad,
                   args.max_bad_steps)


def recover_from_bad_steps(accelerator, ckpt: CheckpointManager, state: TrainState, args, metrics: Metrics, bar,
                           dataset, local_batch: int):
    """:func:`restore_after_bad_steps`, then rewind the metrics and progress bar; returns the restarted batch iterator."""
    restore_after_bad_steps(accelerator, ckpt, state, args)
    metrics.truncate(state.step)
    metrics.log({"event": "restore", "lr_scale": state.lr_scale, "restores": state.restores}, state.step, tb=False)
    batches = iter(make_train_loader(dataset, args, accelerator, local_batch, state.step, state.stream_positions))
    bar.n = state.step
    return batches


def jsonable_args(args) -> dict:
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, dict, type(None)))}


def checkpoint_if_due(accelerator, ckpt: CheckpointManager, state: TrainState, args, max_steps: float,
                      due: bool) -> bool:
    """Save a checkpoint every ``--checkpointing_steps`` and at the last step; returns whether one is still due
    (postponed by a run of bad steps)."""
    due = due or state.step % args.checkpointing_steps == 0
    if due and state.consecutive_bad and state.step != max_steps:
        pass  # never checkpoint inside a run of bad steps: a restore must go back before it
    elif due or state.step == max_steps:
        due = False
        path = ckpt.save(accelerator, state.step, {"training_args.json": json.dumps(jsonable_args(args), indent=2)})
        logger.info("saved %s", path)
    return due


# --------------------------------------------------------------------------------------------------
# Models and data


def resolve_model_spec(args, kinds) -> tuple[str, dict, dict]:
    """(kind, constructor keywords, preset diffusion settings) from --preset / --model_config / model:."""
    from guided_pipelines.conversion import PRESETS, preset_model

    spec = dict(args.model or {})
    if args.model_config:
        if not os.path.isfile(args.model_config):
            raise FileNotFoundError(f"--model_config {args.model_config!r} does not exist")
        with open(args.model_config) as f:
            if args.model_config.endswith((".yaml", ".yml")):
                import yaml

                spec.update(yaml.safe_load(f) or {})
            else:
                spec.update(json.load(f))
    if args.preset:
        spec["preset"] = args.preset
    class_name = spec.pop("_class_name", None)
    spec = {k: v for k, v in spec.items() if not k.startswith("_")}
    kind = spec.pop("kind", None)
    if class_name and kind is None:
        kind = {"ADMUNet2DModel": "unet", "ADMSuperResUNet2DModel": "superres", "ADMClassifierModel": "classifier"}.get(class_name)
    preset_info = {}
    kwargs = {}
    preset = spec.pop("preset", None)
    if preset is not None:
        if preset not in PRESETS:
            import difflib

            close = difflib.get_close_matches(preset, PRESETS, n=2)
            raise ValueError(f"unknown preset {preset!r}" + (f"; did you mean {', '.join(close)}?" if close else
                                                              f"; known: {', '.join(PRESETS)}"))
        preset_info = PRESETS[preset]
        if kind is not None and kind != preset_info["kind"]:
            raise ValueError(f"preset {preset!r} is a {preset_info['kind']} model, not {kind}")
        kind = preset_info["kind"]
        kwargs = {k: v for k, v in preset_model(preset, device="meta").config.items() if not k.startswith("_")}
    kind = kind or kinds[0]
    if kind not in kinds:
        hint = " (train it with training/train_classifier.py)" if kind == "classifier" else ""
        hint = " (train it with training/train_diffusion.py)" if kind != "classifier" and "classifier" in kinds else hint
        raise ValueError(f"model kind {kind!r} cannot be trained here{hint}; choose one of {', '.join(kinds)}")
    kwargs.update(spec)
    for key in ("attention_resolutions", "channel_mult"):
        if key in kwargs and isinstance(kwargs[key], list):
            kwargs[key] = tuple(kwargs[key])
    if not kwargs and preset is None:
        raise ValueError("no model given: pass --preset NAME, --model_config FILE, or a 'model:' mapping in --config")
    return kind, kwargs, preset_info


def model_class(kind: str):
    from guided_pipelines.models import ADMClassifierModel, ADMSuperResUNet2DModel, ADMUNet2DModel

    return {"unet": ADMUNet2DModel, "superres": ADMSuperResUNet2DModel, "classifier": ADMClassifierModel}[kind]


def instantiate(kind: str, kwargs: dict, init_weights: str | None = None):
    import inspect

    cls = model_class(kind)
    unknown = set(kwargs) - set(inspect.signature(cls.__init__).parameters) - {"self"}
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keywords in the model config: {', '.join(sorted(unknown))}")
    model = cls(**kwargs)
    if init_weights:
        load_init_weights(model, init_weights, kind)
    return model


def load_init_weights(model, path: str, kind: str) -> None:
    """Copy weights from a diffusers folder (model or pipeline) or an original .pt/.safetensors file."""
    from guided_pipelines.conversion import load_checkpoint, load_original_state_dict

    if os.path.isdir(path):
        sub = {"unet": "unet", "superres": "unet", "classifier": "classifier"}[kind]
        folder = os.path.join(path, sub) if os.path.isdir(os.path.join(path, sub)) else path
        source = type(model).from_pretrained(folder)
        state = source.state_dict()
    else:
        state = load_checkpoint(path)
    load_original_state_dict(model, state)


def build_dataset(args, sample_size: int, channels: int, class_cond: bool, accelerator, source=None, split=None,
                  random_crop=None, random_flip=None, streaming=None):
    """The training (or, with ``source``/``split``, the validation) dataset for this process."""
    from guided_pipelines.data import load_image_dataset

    return load_image_dataset(
        args.dataset if source is None else source,
        split=args.dataset_split if split is None else split,
        image_size=sample_size,
        class_cond=class_cond,
        random_crop=args.random_crop if random_crop is None else random_crop,
        random_flip=args.random_flip if random_flip is None else random_flip,
        streaming=args.streaming if streaming is None else streaming,
        num_channels=channels,
        seed=args.seed,
        layout=args.dataset_layout,
        image_column=args.image_column,
        label_column=args.label_column,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        shuffle_buffer_size=args.shuffle_buffer_size,
        cache_dir=args.cache_dir,
    )


def resolve_classes(kind: str, kwargs: dict, args, accelerator):
    """Load the training dataset at the model's size and channel count, and reconcile its class count
    with the model's ``num_classes`` (``"auto"``: take the dataset's). Returns the dataset."""
    import inspect

    params = inspect.signature(model_class(kind).__init__).parameters
    default = lambda name: params[name].default  # noqa: E731
    wanted = kwargs.get("num_classes", default("num_classes"))
    size = kwargs.get("sample_size", default("sample_size"))
    channels = kwargs.get("in_channels", default("in_channels"))
    if kind == "classifier" and wanted is None:
        raise ValueError("a classifier needs num_classes (an integer or 'auto'), not null")
    class_cond = wanted is not None
    dataset = build_dataset(args, size, channels, class_cond, accelerator)
    if wanted == "auto":
        if dataset.num_classes is None:
            raise ValueError("num_classes: auto, but the dataset's class count is unknown; set num_classes explicitly")
        kwargs["num_classes"] = dataset.num_classes
    elif class_cond:
        if not isinstance(wanted, int) or isinstance(wanted, bool) or wanted < 1:
            raise ValueError(f"the model's num_classes must be a positive integer, 'auto' or null, got {wanted!r}")
        if dataset.num_classes is not None and dataset.num_classes != wanted:
            raise ValueError(
                f"class-count mismatch: the dataset {args.dataset!r} has {dataset.num_classes} classes but the model "
                f"is built for {wanted}; set the model's num_classes: {dataset.num_classes} (or 'auto') in the config "
                f"(model: {{num_classes: auto}}), or train on a dataset with {wanted} classes"
            )
    return dataset, size, channels


# --------------------------------------------------------------------------------------------------
# Output folders


def save_pipeline_folder(unet, scheduler, folder: str, id2label: dict | None = None) -> None:
    """Write ``unet`` + ``scheduler`` (safetensors) as a pipeline folder loadable with
    ``ClassifierGuidedPipeline.from_pretrained(folder)`` (``ADMUpsamplePipeline`` for a super-res UNet);
    ``id2label`` (class id → name, e.g. the dataset's folder names) goes into ``model_index.json``."""
    from guided_pipelines.models import ADMSuperResUNet2DModel

    superres = isinstance(unet, ADMSuperResUNet2DModel)
    id2label = {int(k): str(v) for k, v in id2label.items()} if id2label else None
    try:
        if superres:
            from guided_pipelines.pipelines import ADMUpsamplePipeline

            pipe = ADMUpsamplePipeline(unet=unet, scheduler=scheduler, id2label=id2label)
        else:
            from guided_pipelines.pipelines import ClassifierGuidedPipeline

            pipe = ClassifierGuidedPipeline(unet=unet, scheduler=scheduler, classifier=None, id2label=id2label)
    except ImportError as err:  # an install without the pipelines: write the same layout by hand
        logger.info("saving the pipeline folder by components (%s)", err)
    else:
        pipe.save_pretrained(folder, safe_serialization=True)
        return
    import diffusers

    unet.save_pretrained(os.path.join(folder, "unet"), safe_serialization=True)
    scheduler.save_pretrained(os.path.join(folder, "scheduler"))
    index = {
        "_class_name": "ADMUpsamplePipeline" if superres else "ClassifierGuidedPipeline",
        "_diffusers_version": diffusers.__version__,
        "id2label": id2label,
        "unet": ["guided_pipelines", type(unet).__name__],
        "scheduler": ["guided_pipelines", type(scheduler).__name__],
    }
    if not superres:
        index["classifier"] = [None, None]
        index["recommended_classifier_scale"] = None
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)


def float32_copy(model: torch.nn.Module) -> torch.nn.Module:
    """An eval-mode float32 copy without gradient checkpointing, for saving."""
    clone = copy.deepcopy(model)
    if any(p.dtype != torch.float32 for p in clone.parameters()):
        clone = clone.to(torch.float32)
    if getattr(clone, "gradient_checkpointing", False) and hasattr(clone, "disable_gradient_checkpointing"):
        clone.disable_gradient_checkpointing()
    return clone.eval()


def ema_copy(model: torch.nn.Module, ema: EMA, rate: float) -> torch.nn.Module:
    clone = float32_copy(model)
    ema.copy_to(clone, rate)
    return clone


def push_to_hub(folder: str, repo_id: str, private: bool, message: str) -> None:
    """Upload ``folder`` to the Hub model repository ``repo_id`` (token from HF_TOKEN / login)."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message=message)
    logger.info("pushed %s to https://huggingface.co/%s", folder, repo_id)


class Throughput:
    def __init__(self):
        self.t = time.perf_counter()

    def tick(self, images: int) -> float:
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        return images / dt if dt > 0 else float("nan")


def setup_logging(accelerator) -> None:
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if accelerator.is_local_main_process else logging.WARNING,
    )
    for noisy in ("datasets", "PIL", "accelerate.checkpointing", "accelerate.accelerator"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# --------------------------------------------------------------------------------------------------
# FID monitoring (train_diffusion.py --eval_every)


def add_fid_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the periodic FID / sFID monitor (:class:`FIDMonitor`)."""
    g = parser.add_argument_group("FID monitoring")
    g.add_argument("--eval_every", type=int, default=0,
                   help="every N steps (and at the last step) sample the first EMA weights and log eval/fid and "
                        "eval/sfid (0: off)")
    g.add_argument("--eval_num_samples", type=int, default=2000, help="samples per evaluation, all processes together")
    g.add_argument("--eval_batch_size", type=int, default=128, help="per-process batch for sampling and Inception")
    g.add_argument("--eval_inception_weights", default=None,
                   help="torch-fidelity's Inception-v3 weights file weights-inception-2015-12-05-6726825d.pth "
                        "(None: download it)")
    g.add_argument("--eval_reference", default=None,
                   help="reference batch .npz in the original format (arr_0 uint8 NHWC and/or stored mu, sigma, "
                        "mu_s, sigma_s); None: --eval_num_samples images of --dataset")
    g.add_argument("--eval_reference_split", default=None,
                   help="without --eval_reference: the split of --dataset to take reference images from "
                        "(None: --dataset_split; e.g. validation for held-out images)")
    g.add_argument("--eval_respacing", default="ddim25",
                   help="sampling steps, the original strings: 'ddimN' samples with DDIM (eta 0), 'N' ancestrally")
    g.add_argument("--eval_fid_method", choices=["eigh", "sqrtm"], default="eigh",
                   help="eigh: the same Fréchet distance from symmetric eigenvalues (seconds); sqrtm: the "
                        "original evaluator's scipy sqrtm (minutes on one CPU thread)")


def check_fid_arguments(args, parser) -> None:
    if args.eval_every < 0:
        parser.error(f"--eval_every must be ≥ 0 (0: no FID monitoring), got {args.eval_every}")
    if not args.eval_every:
        return
    if args.eval_num_samples < 2:
        parser.error(f"--eval_num_samples must be ≥ 2 (FID needs a covariance), got {args.eval_num_samples}")
    if args.eval_batch_size < 1:
        parser.error(f"--eval_batch_size must be positive, got {args.eval_batch_size}")
    if args.eval_inception_weights is not None and not os.path.isfile(args.eval_inception_weights):
        parser.error(
            f"--eval_inception_weights {args.eval_inception_weights!r} not found; download {INCEPTION_URL} and pass "
            "its path (or leave the flag out to download it), or set --eval_every 0"
        )
    if args.eval_reference is not None and not os.path.isfile(args.eval_reference):
        parser.error(
            f"--eval_reference {args.eval_reference!r} not found; pass a reference batch .npz (e.g. the released "
            "VIRTUAL_imagenet64_labeled.npz) or leave the flag out to use images of --dataset"
        )


class preserved_rng:
    """Context manager restoring the global torch (CPU and current CUDA device), numpy and ``random``
    generators on exit, so evaluation cannot shift any random stream the training loop reads."""

    def __init__(self, device):
        self.device = torch.device(device)

    def __enter__(self):
        import random

        self._python = random.getstate()
        self._numpy = np.random.get_state()
        self._torch = torch.get_rng_state()
        self._cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return self

    def __exit__(self, *exc):
        import random

        random.setstate(self._python)
        np.random.set_state(self._numpy)
        torch.set_rng_state(self._torch)
        if self._cuda is not None:
            torch.cuda.set_rng_state(self._cuda, self.device)
        return False


def inception_uint8(images: torch.Tensor, data: bool = False) -> torch.Tensor:
    """Model-space images (N, C, H, W) in [-1, 1] → uint8 (N, 3, H, W) for the Inception network,
    grayscale repeated to RGB. Samples are converted as the original export does,
    ``((x + 1) * 127.5).clamp(0, 255)`` truncated; dataset images (``data=True``, which are
    ``u / 127.5 − 1`` of uint8 ``u``) are rounded instead, which recovers ``u`` exactly."""
    x = ((images.float() + 1) * 127.5).clamp(0, 255)
    out = (x.round() if data else x).to(torch.uint8)
    if out.shape[1] == 1:
        out = out.repeat(1, 3, 1, 1)
    elif out.shape[1] != 3:
        raise ValueError(f"FID needs 1- or 3-channel images, got {out.shape[1]} channels")
    return out.contiguous()


class FIDMonitor:
    """FID and sFID of samples from the EMA weights, every ``--eval_every`` steps.

    Built before training starts (so a bad weights file or reference stops the run at once): loads
    the ADM evaluator's Inception network (``guided_pipelines.inception``) and the reference
    statistics -- stored ``mu``/``sigma``/``mu_s``/``sigma_s`` of ``--eval_reference``, else the
    features of its ``arr_0`` images, else of ``--eval_num_samples`` images of the training data
    (a seeded random subset, center-cropped, not flipped) -- into torchmetrics
    ``ADMFrechetInceptionDistance`` / ``ADMSpatialFrechetInceptionDistance`` metrics that keep the
    real statistics across evaluations.

    :meth:`evaluate` samples ``--eval_num_samples`` images with a ``ClassifierGuidedPipeline`` on the
    first EMA weights (``classifier_scale=0``); sample ``i``'s label, x_T and step noise come from
    ``(seed, i)`` (``guided_pipelines.generation.SampleNoise``), the same at every evaluation and for
    any process count; process ``r`` generates the contiguous share ``[N·r/W, N·(r+1)/W)``; the
    metrics sum the feature statistics across processes. The global random generators are restored
    afterwards and the model, EMA and data loader are only read, so training with and without
    ``--eval_every`` gives the same weights."""

    def __init__(self, args, accelerator, scheduler, model_config, superres: bool = False):
        if superres:
            raise ValueError(
                "--eval_every (FID monitoring) samples base models with ClassifierGuidedPipeline; a super-resolution "
                "model needs low-resolution inputs: evaluate it with ADMUpsamplePipeline after training, or set "
                "--eval_every 0"
            )
        try:
            from guided_pipelines import evaluator, inception
            from guided_pipelines.schedulers import ADMScheduler
            from guided_pipelines.schedulers.scheduling_adm import space_timesteps
        except ImportError as err:
            raise ValueError(
                f"--eval_every needs the evaluation extras ({err}): pip install -e '.[eval]' "
                "(torch-fidelity, torchmetrics, scipy), or set --eval_every 0"
            ) from err
        self.args, self.accelerator = args, accelerator
        self.device = accelerator.device
        # float64 statistics: on the accelerator for NCCL sync when it is CUDA, else on the CPU (gloo).
        self.metric_device = self.device if self.device.type == "cuda" else torch.device("cpu")
        self.channels, self.size = model_config.in_channels, model_config.sample_size
        if self.channels not in (1, 3):
            raise ValueError(f"--eval_every: FID needs 1- or 3-channel images, the model makes {self.channels}")
        self.num_classes = model_config.num_classes
        self.respacing = str(args.eval_respacing)
        self.use_ddim = self.respacing.startswith("ddim")
        T = scheduler.config.num_train_timesteps
        try:
            space_timesteps(T, self.respacing)
        except ValueError as err:
            raise ValueError(f"--eval_respacing: {err}") from err
        self.scheduler = ADMScheduler.from_config(scheduler.config)  # set_timesteps must not touch training's
        self.seed = mix_seed(args.seed, 7)
        self.num_samples = args.eval_num_samples
        W, r = accelerator.num_processes, accelerator.process_index
        self.share = (self.num_samples * r // W, self.num_samples * (r + 1) // W)

        with preserved_rng(self.device):
            weights = args.eval_inception_weights
            try:
                with accelerator.main_process_first():  # one process downloads the default weights
                    self.extractor = inception.ADMInception(weights)
            except (FileNotFoundError, ValueError) as err:  # missing, corrupt or not Inception weights
                message = str(err).replace("--inception-weights", "--eval_inception_weights")
                if "--eval_inception_weights" not in message:
                    message = f"--eval_inception_weights: {message}"
                raise type(err)(message) from err
            self.extractor = self.extractor.to(self.device).eval()
            pool_ref, spatial_ref, reader = None, None, None
            if args.eval_reference:
                reader = evaluator.open_images(args.eval_reference, role="reference", require=False)
                pool_ref, spatial_ref = evaluator._stored_statistics(reader, "reference")
                if (pool_ref is None or spatial_ref is None) and not reader.present:
                    raise ValueError(
                        f"--eval_reference {args.eval_reference}: no arr_0 images and no stored mu/sigma and "
                        "mu_s/sigma_s; pass a reference batch in the original format"
                    )
            kwargs = dict(reset_real_features=False, fid_method=args.eval_fid_method)
            self.fid = inception.ADMFrechetInceptionDistance(
                reference=None if pool_ref is None else tuple(pool_ref), **kwargs).to(self.metric_device)
            self.sfid = inception.ADMSpatialFrechetInceptionDistance(
                reference=None if spatial_ref is None else tuple(spatial_ref), **kwargs).to(self.metric_device)
            need = [m for m, ref in ((self.fid, pool_ref), (self.sfid, spatial_ref)) if ref is None]
            if need:
                batches = self._npz_batches(reader) if reader is not None else self._dataset_batches()
                count = 0
                for images in batches:
                    self._update(need, images, real=True)
                    count += len(images)
                total = int(accelerator.reduce(torch.tensor([count], device=self.device), reduction="sum").item())
                if total < 2:
                    raise ValueError(f"--eval_every: only {total} reference image(s); FID needs at least 2")
                where = args.eval_reference or f"{args.dataset} ({args.eval_reference_split or args.dataset_split})"
                logger.info("FID reference: features of %d images of %s", total, where)
            else:
                logger.info("FID reference: stored statistics of %s", args.eval_reference)

    # ---------------------------------------------------------------------------------------------
    def _update(self, metrics, images_uint8: torch.Tensor, real: bool) -> None:
        pool, spatial, _ = self.extractor(images_uint8.to(self.device))
        for metric in metrics:
            metric.update(features=pool if metric is self.fid else spatial, real=real)

    def _npz_batches(self, reader):
        """This process's share of ``arr_0`` (batch ``b`` goes to process ``b mod W``), uint8 NCHW."""
        if reader.shape[1:3] != (self.size, self.size):
            logger.warning("--eval_reference images are %dx%d, the model makes %dx%d: FID compares resolutions",
                           reader.shape[1], reader.shape[2], self.size, self.size)
        W, r = self.accelerator.num_processes, self.accelerator.process_index
        for b, batch in enumerate(reader.batches(self.args.eval_batch_size)):
            if b % W == r:
                yield torch.from_numpy(np.array(batch)).permute(0, 3, 1, 2)  # a copy: memmaps are read-only

    def _dataset_batches(self):
        """``--eval_num_samples`` images of the training data (another split with
        ``--eval_reference_split``), without augmentation, this process's share, uint8 NCHW."""
        from guided_pipelines.data import StreamingImageDataset, collate

        args, acc = self.args, self.accelerator
        with acc.main_process_first():
            dataset = build_dataset(args, self.size, self.channels, False, acc, split=args.eval_reference_split,
                                    random_crop=False, random_flip=False)
        bs = args.eval_batch_size
        if isinstance(dataset, StreamingImageDataset):  # already split by process: the first images of the stream
            W, r = acc.num_processes, acc.process_index
            want = self.num_samples * (r + 1) // W - self.num_samples * r // W
            loader = torch.utils.data.DataLoader(dataset, batch_size=bs, collate_fn=collate, num_workers=0)
            seen = 0
            for batch in loader:
                if seen >= want:
                    break
                images = batch["image"][: want - seen]
                seen += len(images)
                yield inception_uint8(images, data=True)
            return
        n = min(self.num_samples, len(dataset))
        if n < self.num_samples:
            logger.warning("FID reference: the dataset has %d images, fewer than --eval_num_samples %d", n,
                           self.num_samples)
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(mix_seed(args.seed, 9)))[:n]
        W, r = acc.num_processes, acc.process_index
        mine = [(int(i), 0) for i in order[n * r // W : n * (r + 1) // W]]
        if not mine:
            return
        workers = args.dataloader_num_workers
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, mine), batch_size=bs, collate_fn=collate,
                                             num_workers=workers, prefetch_factor=2 if workers else None)
        for batch in loader:
            yield inception_uint8(batch["image"], data=True)

    # ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, ema: EMA) -> dict:
        """FID and sFID of ``--eval_num_samples`` samples of the first EMA weights (the raw weights
        without EMA rates); every process must call it. Returns the values to log."""
        from guided_pipelines.generation import SampleNoise
        from guided_pipelines.pipelines import ClassifierGuidedPipeline

        start = time.perf_counter()
        with preserved_rng(self.device):
            unet = ema_copy(model, ema, ema.rates[0]) if ema.rates else float32_copy(model)
            # accelerate's mixed-precision forward wrapper is copied along; sample in float32.
            unet.__dict__.pop("forward", None)
            unet.__dict__.pop("_original_forward", None)
            unet.requires_grad_(False)
            pipe = ClassifierGuidedPipeline(unet=unet, scheduler=self.scheduler, classifier=None)
            pipe.set_progress_bar_config(disable=True)
            self.fid.reset()
            self.sfid.reset()
            lo, hi = self.share
            shape = (self.channels, self.size, self.size)
            for a in range(lo, hi, self.args.eval_batch_size):
                b = min(a + self.args.eval_batch_size, hi)
                noise = SampleNoise(self.seed, range(a, b), shape, self.num_classes)
                out = pipe(class_labels=noise.labels, num_images=b - a, classifier_scale=0.0, respacing=self.respacing,
                           use_ddim=self.use_ddim, latents=noise.x_T, step_noise=noise.step_noise, output_type="latent")
                self._update((self.fid, self.sfid), inception_uint8(out.images), real=False)
            del pipe, unet
            fid, sfid = float(self.fid.compute()), float(self.sfid.compute())
            self.fid.reset()
            self.sfid.reset()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return {"eval/fid": fid, "eval/sfid": sfid, "eval/num_samples": self.num_samples,
                "eval/seconds": time.perf_counter() - start}
