"""Train the noisy classifier p_φ(y | x_t, t) of classifier guidance (Dhariwal & Nichol 2021, Sec. 4.1).

    accelerate launch training/train_classifier.py --config training/configs/classifier_imagenet64.yaml

As the original ``classifier_train.py``: every image is noised to a timestep t drawn uniformly
(x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε, ``scheduler.add_noise``; ``--noised_max_timestep`` keeps only
t < max, ``--noised false`` trains on clean images at t = 0), cross-entropy loss, random crops,
AdamW with weight decay, linear lr anneal. Periodic validation on a held-out split reports loss,
acc@1 and acc@5 overall and per timestep quartile. ``--batch_size`` is the GLOBAL batch. Writes
``ADMClassifierModel`` folders (``OUTPUT/classifier``; ``from_pretrained`` loads them, and
``ClassifierGuidedPipeline(..., classifier=...)`` uses them)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_utils as tu  # noqa: E402

logger = logging.getLogger("guided_pipelines.training")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train a noisy ADM classifier with accelerate.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    tu.add_common_arguments(parser)
    g = parser.add_argument_group("classifier")
    g.add_argument("--preset", default=None, help="architecture of a released classifier, e.g. 64x64_classifier.pt")
    g.add_argument("--model_config", default=None, help="JSON/YAML file of ADMClassifierModel keywords")
    g.add_argument("--init_weights", default=None, help="start from a classifier folder or an original .pt")
    g.add_argument("--noised", type=tu.str2bool, default=True, help="train on noised images x_t (false: clean, t=0)")
    g.add_argument("--noised_max_timestep", type=int, default=None, help="draw t < this (default: all T steps)")
    g.add_argument("--val_dataset", default=None, help="held-out data (default: --dataset with --val_split)")
    g.add_argument("--val_split", default="validation")
    g.add_argument("--eval_every", type=int, default=1000, help="validate every N steps (0: only at the end)")
    g.add_argument("--val_max_samples", type=int, default=10000, help="validate on the first N held-out images")
    parser.set_defaults(random_crop=True, weight_decay=0.05, lr=3e-4)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = tu.parse_with_config(parser, argv, yaml_only=("model",))
    tu.check_common_arguments(args, parser)
    if args.model is not None and not isinstance(args.model, dict):
        parser.error("config key 'model' must be a mapping (preset: NAME and/or ADMClassifierModel keywords)")
    if args.noised_max_timestep is not None and args.noised_max_timestep < 1:
        parser.error(f"--noised_max_timestep must be ≥ 1, got {args.noised_max_timestep}")
    if args.eval_every < 0 or args.val_max_samples < 0:
        parser.error("--eval_every and --val_max_samples must be ≥ 0")
    return args


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, logits.shape[-1])
    return (logits.topk(k, dim=-1).indices == labels[:, None]).any(dim=-1).float()


class Validator:
    """Loss, acc@1, acc@5 on a held-out split, overall and per timestep quartile.

    Every held-out image i gets a fixed timestep and noise drawn from a generator seeded by
    (seed, i), so the numbers are comparable across evaluations and independent of process count.
    The split is divided contiguously across processes; sums are reduced across processes."""

    def __init__(self, dataset, args, accelerator, T: int, t_max: int, micro: int):
        self.args, self.accelerator = args, accelerator
        n = min(len(dataset), args.val_max_samples) if args.val_max_samples else len(dataset)
        W, r = accelerator.num_processes, accelerator.process_index
        lo, hi = n * r // W, n * (r + 1) // W
        self.indices = list(range(lo, hi))
        self.dataset, self.T, self.t_max, self.micro, self.n = dataset, T, t_max, micro, n

    @torch.no_grad()
    def run(self, model, scheduler) -> dict:
        from guided_pipelines.data import collate

        device = self.accelerator.device
        sums = torch.zeros(4, 4, dtype=torch.float64, device=device)  # quartile × (count, loss, acc1, acc5)
        was_training = model.training
        model.eval()
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(self.dataset, [(i, 0) for i in self.indices]) if self.indices else [],
            batch_size=self.micro, collate_fn=collate, num_workers=0,
        )
        for batch in loader:
            x = batch["image"].to(device)
            labels = batch["label"].to(device)
            t = torch.empty(len(x), dtype=torch.long)
            noise = torch.empty_like(x, device="cpu")
            for j, index in enumerate(batch["index"].tolist()):
                g = torch.Generator().manual_seed(tu.mix_seed(self.args.seed, 5, index))
                t[j] = torch.randint(0, self.t_max, (1,), generator=g) if self.args.noised else 0
                noise[j] = torch.randn(x.shape[1:], generator=g)
            t = t.to(device)
            if self.args.noised:
                x = scheduler.add_noise(x, noise.to(device), t)
            with self.accelerator.autocast():
                logits = model(x, t).float()
            loss = F.cross_entropy(logits, labels, reduction="none")
            q = (4 * t.double() / self.T).long().clamp(max=3)
            stats = torch.stack([torch.ones_like(loss), loss, topk_correct(logits, labels, 1),
                                 topk_correct(logits, labels, 5)], dim=1).double()
            sums.index_add_(0, q, stats)
        if was_training:
            model.train()
        sums = self.accelerator.reduce(sums, reduction="sum").cpu()
        out = {}
        total = sums.sum(dim=0)
        if total[0] > 0:
            out.update({"val_loss": float(total[1] / total[0]), "val_acc@1": float(total[2] / total[0]),
                        "val_acc@5": float(total[3] / total[0]), "val_count": int(total[0])})
        for q in range(4):
            if sums[q, 0] > 0:
                out.update({f"val_loss_q{q}": float(sums[q, 1] / sums[q, 0]),
                            f"val_acc@1_q{q}": float(sums[q, 2] / sums[q, 0]),
                            f"val_acc@5_q{q}": float(sums[q, 3] / sums[q, 0])})
        return out


def main(argv=None) -> int:
    args = parse_args(argv)

    from guided_pipelines.losses import UniformSampler
    from guided_pipelines.schedulers import ADMScheduler

    accelerator = tu.make_accelerator(args)
    local_batch, micro = tu.split_batch(args, accelerator.num_processes)
    W, rank = accelerator.num_processes, accelerator.process_index

    _, model, _, dataset, size, channels = tu.build_model_and_data(args, accelerator, ("classifier",))
    num_classes = model.config.num_classes
    scheduler = ADMScheduler(
        num_train_timesteps=args.num_train_timesteps or 1000, beta_schedule=args.beta_schedule or "linear"
    )
    T = scheduler.config.num_train_timesteps
    t_max = args.noised_max_timestep or T
    if t_max > T:
        raise ValueError(f"--noised_max_timestep {t_max} exceeds the {T} diffusion steps (--num_train_timesteps)")
    validator = None
    val_source = args.val_dataset or args.dataset
    if args.val_max_samples:
        try:
            with accelerator.main_process_first():
                val_set = tu.build_dataset(args, size, channels, True, accelerator, source=val_source,
                                           split=args.val_split, random_crop=False, random_flip=False, streaming=False)
        except (ValueError, FileNotFoundError) as err:
            raise ValueError(
                f"cannot load the held-out split {args.val_split!r} of {val_source!r} ({err}); pass --val_dataset / "
                "--val_split, or --val_max_samples 0 to train without validation"
            ) from err
        if val_set.num_classes is not None and val_set.num_classes != num_classes:
            raise ValueError(
                f"class-count mismatch: the held-out split has {val_set.num_classes} classes, the classifier "
                f"{num_classes}; the validation data must use the training classes"
            )
        validator = Validator(val_set, args, accelerator, T, t_max, micro)
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    if accelerator.is_main_process:
        logger.info("ADMClassifierModel with %.1fM parameters, %d classes, %s schedule, t < %d",
                    sum(p.numel() for p in model.parameters()) / 1e6, num_classes, scheduler.config.beta_schedule,
                    t_max if args.noised else 1)

    optimizer = tu.make_optimizer(model, args)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    sampler = UniformSampler(t_max)
    state = tu.TrainState()
    accelerator.register_for_checkpointing(state)

    ckpt = tu.CheckpointManager(args.output_dir, args.checkpoints_total_limit)
    resume_path = tu.resume_from_checkpoint(accelerator, ckpt, state, args, W)
    state.world_size, state.global_batch = W, args.batch_size
    max_steps = args.max_train_steps if args.max_train_steps is not None else math.inf

    tu.init_trackers(accelerator, "train_classifier", args)
    metrics = tu.Metrics(accelerator, args.output_dir, state.step if resume_path else None)
    faults = tu.Faults()
    batches = iter(tu.make_train_loader(dataset, args, accelerator, local_batch, state.step, state.stream_positions))
    device = accelerator.device
    scaler_on = getattr(accelerator, "scaler", None) is not None
    bar = tu.progress_bar(accelerator, max_steps, state.step, "train classifier")
    clock = tu.Throughput()
    sl = slice(rank * local_batch, (rank + 1) * local_batch)
    due = False

    while state.step < max_steps:
        step = state.step
        batch = next(batches)
        tu.seed_step(args.seed, step, rank)
        t_gen, n_gen = tu.step_generators(args.seed, step, device)
        if args.noised:
            t_all, _ = sampler.sample(args.batch_size, generator=t_gen)
            noise_all = torch.randn((args.batch_size, channels, size, size), generator=n_gen, device=device)
        else:
            t_all = torch.zeros(args.batch_size, dtype=torch.long)
        t = t_all[sl].to(device)
        x = batch["image"].to(device)
        labels = batch["label"].to(device)
        if args.noised:
            x = scheduler.add_noise(x, noise_all[sl], t)
        lr = tu.set_step_lr(optimizer, step, args, state)
        inject_nan = faults.nan_now(step)

        rows = []
        for i in range(0, local_batch, micro):
            last = i + micro >= local_batch
            with tu.microbatch_sync(accelerator, model, last):
                logits = model(x[i : i + micro], t[i : i + micro]).float()
                losses = F.cross_entropy(logits, labels[i : i + micro], reduction="none")
                loss = losses.sum() / local_batch
                if inject_nan:
                    loss = loss * float("nan")
                accelerator.backward(loss)
            rows.append(torch.stack([losses.detach() * (float("nan") if inject_nan else 1.0),
                                     topk_correct(logits.detach(), labels[i : i + micro], 1),
                                     topk_correct(logits.detach(), labels[i : i + micro], 5)], dim=1))

        grad_norm = tu.grad_norm_(accelerator, model, args.max_grad_norm)
        gathered = accelerator.gather(torch.cat(rows)).cpu()
        skipped = int(accelerator.gather(batch["skipped"].sum().reshape(1).to(device)).sum())
        loss_ok = bool(torch.isfinite(gathered[:, 0]).all())
        grad_ok = bool(torch.isfinite(grad_norm))
        applied, bad = tu.optimizer_step(optimizer, scaler_on, loss_ok, grad_ok)
        tu.advance_state(state, args, batch, skipped, bad)
        speed = clock.tick(args.batch_size)
        bar.update(1)

        if state.step % args.logging_steps == 0 or bad or state.step == max_steps:
            values = tu.quartile_means(
                {"loss": gathered[:, 0], "acc@1": gathered[:, 1], "acc@5": gathered[:, 2]}, t_all, T, prefix=""
            )
            metrics.log(tu.step_log_values(values, grad_norm, lr, speed, state, applied), state.step)
            bar.set_postfix(loss=f"{values['loss']:.4f}", acc=f"{values['acc@1']:.3f}")
        if bad:
            tu.warn_bad_step(state, loss_ok, args)
        if state.consecutive_bad >= args.max_bad_steps:
            batches = tu.recover_from_bad_steps(accelerator, ckpt, state, args, metrics, bar, dataset, local_batch)
            continue

        if validator is not None and (
            (args.eval_every and state.step % args.eval_every == 0) or state.step == max_steps
        ):
            values = validator.run(unwrapped, scheduler)
            metrics.log(values, state.step)
            if accelerator.is_main_process and values:
                logger.info("step %d: val loss %.4f, acc@1 %.4f, acc@5 %.4f", state.step, values["val_loss"],
                            values["val_acc@1"], values["val_acc@5"])

        due = tu.checkpoint_if_due(accelerator, ckpt, state, args, max_steps, due)
        faults.after_step(state.step)
    bar.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        folder = os.path.join(args.output_dir, "classifier")
        tu.float32_copy(unwrapped).save_pretrained(folder, safe_serialization=True)
        with open(os.path.join(folder, "noise_schedule.json"), "w") as f:
            json.dump({"num_train_timesteps": T, "beta_schedule": scheduler.config.beta_schedule,
                       "noised": args.noised, "noised_max_timestep": t_max}, f, indent=2)
        logger.info("wrote %s", folder)
        if args.push_to_hub:
            tu.push_to_hub(folder, args.hub_model_id, args.hub_private, f"ADM noisy classifier, step {state.step}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    tu.run_script(main, "train_classifier.py")
