"""Train an ADM diffusion model (Dhariwal & Nichol 2021) or its super-resolution variant ADM-U.

    accelerate launch training/train_diffusion.py --config training/configs/imagenet64.yaml

The objective is L_hybrid = L_simple + λ·L_vlb (Nichol & Dhariwal 2021, Eq. 16; ``guided_pipelines.
losses``) with a learned variance, L_simple alone with a fixed one. AdamW with the original linear lr
anneal, float32 EMA at one or more rates, microbatches, bf16/fp16 via accelerate, gradient
checkpointing, exact resume (``--resume_from_checkpoint latest``), rotation, non-finite step guard,
tensorboard, FID / sFID of EMA samples every ``--eval_every`` steps (``eval/fid``, ``eval/sfid``).
``--batch_size`` is the GLOBAL batch: the result does not depend on the process count.
The EMA weights are written as pipeline folders ``OUTPUT/ema_RATE`` (raw weights: ``OUTPUT/model``),
loadable with ``ClassifierGuidedPipeline.from_pretrained``. Run with ``--help`` for every flag."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_utils as tu  # noqa: E402

logger = logging.getLogger("guided_pipelines.training")

MODEL_KINDS = ("unet", "superres")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train an ADM diffusion model (ADM / ADM-U) with accelerate.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    tu.add_common_arguments(parser)
    g = parser.add_argument_group("model")
    g.add_argument("--preset", default=None, help="architecture of a released model, e.g. 64x64_diffusion.pt")
    g.add_argument("--model_config", default=None, help="JSON/YAML file of model keywords (e.g. a saved unet/config.json)")
    g.add_argument("--init_weights", default=None, help="start from a diffusers model/pipeline folder or an original .pt")
    g.add_argument("--variance_type", choices=["learned_range", "fixed_small", "fixed_large"], default=None,
                   help="default: learned_range when the model has 2×channels outputs, else fixed_large")
    g.add_argument("--schedule_sampler", choices=["uniform", "loss-second-moment"], default="uniform")
    g.add_argument("--low_res_size", type=int, default=None, help="super-res: conditioning size (default: the model's)")
    g.add_argument("--ema_rates", type=tu.float_list, default=[0.9999], help="comma-separated, e.g. 0.9999,0.999")
    tu.add_fid_arguments(parser)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = tu.parse_with_config(parser, argv, yaml_only=("model",))
    tu.check_common_arguments(args, parser)
    if args.model is not None and not isinstance(args.model, dict):
        parser.error("config key 'model' must be a mapping (preset: NAME and/or model keywords)")
    if args.low_res_size is not None and args.low_res_size < 1:
        parser.error(f"--low_res_size must be positive, got {args.low_res_size}")
    tu.check_fid_arguments(args, parser)
    return args


# --------------------------------------------------------------------------------------------------
# Model and scheduler


def build_scheduler(args, unet, preset_info: dict):
    from guided_pipelines.schedulers import ADMScheduler

    cfg = unet.config
    variance = args.variance_type
    if variance is None:
        variance = "learned_range" if cfg.out_channels == 2 * cfg.in_channels else "fixed_large"
    if variance == "learned_range" and cfg.out_channels != 2 * cfg.in_channels:
        raise ValueError(
            f"--variance_type learned_range needs out_channels = 2·in_channels = {2 * cfg.in_channels}, the model has "
            f"{cfg.out_channels}; set the model's out_channels or use --variance_type fixed_large"
        )
    return ADMScheduler(
        num_train_timesteps=args.num_train_timesteps or preset_info.get("num_train_timesteps", 1000),
        beta_schedule=args.beta_schedule or preset_info.get("beta_schedule", "linear"),
        variance_type=variance,
    )


# --------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)

    from guided_pipelines.losses import LossSecondMomentResampler, UniformSampler, diffusion_training_losses

    accelerator = tu.make_accelerator(args)
    local_batch, micro = tu.split_batch(args, accelerator.num_processes)
    W, rank = accelerator.num_processes, accelerator.process_index

    kind, model, preset_info, dataset, size, channels = tu.build_model_and_data(args, accelerator, MODEL_KINDS)
    scheduler = build_scheduler(args, model, preset_info)
    superres = kind == "superres"
    low_res_size = args.low_res_size or (model.config.low_res_size if superres else None)
    if superres and not low_res_size:
        raise ValueError("super-res training needs --low_res_size (or low_res_size in the model config)")
    class_cond = model.config.num_classes is not None
    # FID monitoring: Inception network and reference statistics load now, so a bad file stops the run here.
    monitor = tu.FIDMonitor(args, accelerator, scheduler, model.config, superres) if args.eval_every else None
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    if accelerator.is_main_process:
        n_params = sum(p.numel() for p in model.parameters())
        logger.info("%s with %.1fM parameters, %s variance, %s schedule, %d steps", type(model).__name__, n_params / 1e6,
                    scheduler.config.variance_type, scheduler.config.beta_schedule, scheduler.config.num_train_timesteps)

    optimizer = tu.make_optimizer(model, args)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    ema = tu.EMA(unwrapped, args.ema_rates)
    T = scheduler.config.num_train_timesteps
    sampler = UniformSampler(T) if args.schedule_sampler == "uniform" else LossSecondMomentResampler(T)
    state = tu.TrainState()
    for obj in (state, ema, tu.SamplerState(sampler)):
        accelerator.register_for_checkpointing(obj)

    ckpt = tu.CheckpointManager(args.output_dir, args.checkpoints_total_limit)
    resume_path = tu.resume_from_checkpoint(accelerator, ckpt, state, args, W)
    if not resume_path and args.resume_from_checkpoint:
        logger.info("no checkpoint in %s yet: starting from scratch", ckpt.root)
    state.world_size, state.global_batch = W, args.batch_size
    max_steps = args.max_train_steps if args.max_train_steps is not None else math.inf

    tu.init_trackers(accelerator, "train_diffusion", args)
    metrics = tu.Metrics(accelerator, args.output_dir, state.step if resume_path else None)
    faults = tu.Faults()
    loader = tu.make_train_loader(dataset, args, accelerator, local_batch, state.step, state.stream_positions)
    batches = iter(loader)
    device = accelerator.device
    scaler_on = getattr(accelerator, "scaler", None) is not None
    bar = tu.progress_bar(accelerator, max_steps, state.step, "train")
    clock = tu.Throughput()
    sl = slice(rank * local_batch, (rank + 1) * local_batch)
    due = False  # a checkpoint postponed by a run of bad steps

    while state.step < max_steps:
        step = state.step
        batch = next(batches)
        tu.seed_step(args.seed, step, rank)
        t_gen, n_gen = tu.step_generators(args.seed, step, device)
        t_all, w_all = sampler.sample(args.batch_size, generator=t_gen)
        noise_all = torch.randn((args.batch_size, channels, size, size), generator=n_gen, device=device)
        t_loc, w_loc, noise = t_all[sl].to(device), w_all[sl].to(device), noise_all[sl]
        x = batch["image"].to(device)
        y = batch["label"].to(device) if class_cond else None
        low_res = F.interpolate(x, size=(low_res_size, low_res_size), mode="area") if superres else None
        lr = tu.set_step_lr(optimizer, step, args, state)
        inject_nan = faults.nan_now(step)

        terms = {"loss": [], "mse": [], "vb": []}
        for i in range(0, local_batch, micro):
            last = i + micro >= local_batch
            with tu.microbatch_sync(accelerator, model, last):
                out = diffusion_training_losses(
                    model, scheduler, x[i : i + micro], t_loc[i : i + micro], noise=noise[i : i + micro],
                    class_labels=None if y is None else y[i : i + micro],
                    low_res=None if low_res is None else low_res[i : i + micro],
                )
                loss = (out["loss"] * w_loc[i : i + micro]).sum() / local_batch
                if inject_nan:
                    loss = loss * float("nan")
                accelerator.backward(loss)
            for key in terms:
                v = out[key].detach().float()
                terms[key].append(v * float("nan") if inject_nan else v)

        grad_norm = tu.grad_norm_(accelerator, model, args.max_grad_norm)
        local = torch.stack([torch.cat(terms[k]) for k in ("loss", "mse", "vb")] + [w_loc.float()], dim=1)
        extra = torch.stack([batch["skipped"].sum()]).to(device).float()
        gathered = accelerator.gather(local).cpu()  # (B, 4) in global batch order
        skipped = int(accelerator.gather(extra).sum())
        all_loss = gathered[:, 0]
        loss_ok = bool(torch.isfinite(all_loss).all())
        grad_ok = bool(torch.isfinite(grad_norm))
        applied, bad = tu.optimizer_step(optimizer, scaler_on, loss_ok, grad_ok)
        if applied:
            ema.update(unwrapped)
            sampler.update_with_all_losses(t_all, all_loss)
        tu.advance_state(state, args, batch, skipped, bad)
        speed = clock.tick(args.batch_size)
        bar.update(1)

        if state.step % args.logging_steps == 0 or bad or state.step == max_steps:
            values = tu.quartile_means(
                {"loss": all_loss, "mse": gathered[:, 1], "vb": gathered[:, 2]}, t_all, T, prefix=""
            )
            values["loss"] = float((all_loss.double() * gathered[:, 3].double()).mean())  # importance-weighted
            metrics.log(tu.step_log_values(values, grad_norm, lr, speed, state, applied), state.step)
            bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}")
        if bad:
            tu.warn_bad_step(state, loss_ok, args)
        if skipped:
            logger.warning("%d unreadable images skipped so far", state.skipped_images)

        if state.consecutive_bad >= args.max_bad_steps:
            batches = tu.recover_from_bad_steps(accelerator, ckpt, state, args, metrics, bar, dataset, local_batch)
            continue

        if monitor is not None and (state.step % args.eval_every == 0 or state.step == max_steps):
            # before the checkpoint of this step: a run killed in between redoes the step and its evaluation
            values = monitor.evaluate(unwrapped, ema)
            metrics.log(values, state.step)
            logger.info("step %d: FID %.4f, sFID %.4f (%d samples, %s, %.1f s)", state.step, values["eval/fid"],
                        values["eval/sfid"], values["eval/num_samples"], args.eval_respacing, values["eval/seconds"])
            clock.tick(0)  # the evaluation time does not count against images/s

        due = tu.checkpoint_if_due(accelerator, ckpt, state, args, max_steps, due)
        faults.after_step(state.step)
    bar.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        names = getattr(dataset, "class_names", None) if class_cond else None
        id2label = dict(enumerate(names)) if names else None
        model_dir = os.path.join(args.output_dir, "model")
        tu.save_pipeline_folder(tu.float32_copy(unwrapped), scheduler, model_dir, id2label)
        written = [model_dir]
        for rate in ema.rates:
            folder = os.path.join(args.output_dir, f"ema_{rate}")
            tu.save_pipeline_folder(tu.ema_copy(unwrapped, ema, rate), scheduler, folder, id2label)
            written.append(folder)
        logger.info("wrote %s", ", ".join(written))
        if args.push_to_hub:
            tu.push_to_hub(written[1] if len(written) > 1 else written[0], args.hub_model_id, args.hub_private,
                           f"ADM training, step {state.step}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    tu.run_script(main, "train_diffusion.py")
