"""Classifier-guided sampling (ADM-G): Dhariwal & Nichol 2021, Sec. 4, Algorithms 1 and 2."""

from __future__ import annotations

import difflib
import inspect
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .. import models as _models  # noqa: F401  (diffusers loads components only from imported modules)
from ..schedulers.scheduling_adm import ADMScheduler

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class ClassifierGuidedPipelineOutput(BaseOutput):
    """``images`` (PIL list, NHWC numpy in [0, 1], NCHW tensor in [0, 1], or model-space latents in
    [-1, 1]) and the ``class_labels`` (N,) they were sampled for (``None`` when unconditional)."""

    images: list | np.ndarray | torch.Tensor
    class_labels: torch.Tensor | None


def to_uint8(samples: torch.Tensor) -> torch.Tensor:
    """Model-space samples (N, C, H, W) in [-1, 1] → uint8 NHWC exactly as the original export:
    ``((x + 1) * 127.5).clamp(0, 255)`` truncated to uint8."""
    return ((samples + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def postprocess(samples: torch.Tensor, output_type: str, pipe: DiffusionPipeline):
    if output_type == "latent":
        return samples
    images = (samples / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return images
    images = images.cpu().permute(0, 2, 3, 1).float().numpy()
    return images if output_type == "np" else pipe.numpy_to_pil(images)


def resolve_pretrained_path(pretrained_model_name_or_path, kwargs: dict) -> str:
    """A local folder as is; a Hub repo id is downloaded (or found in the cache) with
    ``huggingface_hub.snapshot_download`` first, since diffusers cannot resolve third-party classes
    from a repo id on its own."""
    path = str(pretrained_model_name_or_path)
    if os.path.isdir(path):
        return path
    from huggingface_hub import snapshot_download

    keys = ("cache_dir", "revision", "token", "local_files_only", "force_download", "proxies")
    return snapshot_download(path, **{k: kwargs[k] for k in keys if kwargs.get(k) is not None})


def check_sampling_inputs(pipe: DiffusionPipeline, output_type: str, callback_inputs, eta: float) -> None:
    """Options every pipeline here validates before any model runs."""
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}; got {output_type!r}")
    bad = [k for k in callback_inputs if k not in pipe._callback_tensor_inputs]
    if bad:
        raise ValueError(f"callback_on_step_end_tensor_inputs {bad} not in {pipe._callback_tensor_inputs}")
    if eta < 0:
        raise ValueError(f"eta must be ≥ 0; got {eta}")


def prepare_sampling(pipe, n, generator, latents, num_inference_steps, respacing, use_ddim, device) -> torch.Tensor:
    """Check the generators and ``latents`` (x_T; drawn when ``None``) for ``n`` images of the unet's
    size and set the scheduler's timesteps (ADM respacing, or a diffusers solver's step count)."""
    if isinstance(generator, list) and len(generator) != n:
        raise ValueError(f"got {len(generator)} generators for {n} images; pass one per image")
    config = pipe.unet.config
    shape = (n, config.in_channels, config.sample_size, config.sample_size)
    if latents is None:
        latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
    elif tuple(latents.shape) != shape:
        raise ValueError(f"latents must have shape {shape}; got {tuple(latents.shape)}")
    latents = latents.to(device=device, dtype=torch.float32)
    if isinstance(pipe.scheduler, ADMScheduler):
        pipe.scheduler.set_timesteps(num_inference_steps, device=device, respacing=respacing)
        return latents
    if respacing is not None or use_ddim:
        raise ValueError(
            f"respacing/use_ddim apply to ADMScheduler; {type(pipe.scheduler).__name__} takes num_inference_steps only"
        )
    pipe.scheduler.set_timesteps(num_inference_steps, device=device)
    return latents * pipe.scheduler.init_noise_sigma


def denoise(
    pipe: DiffusionPipeline,
    latents: torch.Tensor,
    model_fn: Callable,
    cond_fn: Callable | None,
    use_ddim: bool,
    eta: float,
    generator,
    step_noise,
    callback_on_step_end,
    callback_on_step_end_tensor_inputs,
) -> torch.Tensor:
    """The reverse process over ``pipe.scheduler.timesteps``.

    ``model_fn(x, t)`` returns the UNet output; ``cond_fn(x, t)`` the scaled guidance gradient
    s·∇_x log p_φ(y | x_t) or ``None``. ADMScheduler applies guidance to the mean (ancestral) or to ε
    (DDIM); any other diffusers scheduler gets ε̂ = ε − √(1−ᾱ_t)·g (Eq. 14) with the variance
    channels split off."""
    scheduler = pipe.scheduler
    timesteps = scheduler.timesteps
    is_adm = isinstance(scheduler, ADMScheduler)
    accepts_generator = "generator" in inspect.signature(scheduler.step).parameters
    if isinstance(step_noise, torch.Tensor):
        expected = (len(timesteps), *latents.shape)
        if tuple(step_noise.shape) != expected:
            raise ValueError(f"step_noise must have shape {expected} (steps, N, C, H, W); got {tuple(step_noise.shape)}")
    with pipe.progress_bar(total=len(timesteps)) as bar:
        for i, t in enumerate(timesteps):
            t_batch = torch.full((latents.shape[0],), int(t), device=latents.device, dtype=torch.long)
            with torch.no_grad():
                model_output = model_fn(latents, t_batch).float()
            gradient = cond_fn(latents, t_batch) if cond_fn is not None else None
            if is_adm:
                noise = None
                if step_noise is not None:
                    noise = step_noise[i] if isinstance(step_noise, torch.Tensor) else step_noise(i, int(t))
                    noise = torch.as_tensor(noise).to(device=latents.device, dtype=latents.dtype)
                    if noise.shape != latents.shape:
                        raise ValueError(f"step_noise for step {i} has shape {tuple(noise.shape)}, expected {tuple(latents.shape)}")
                out = scheduler.step(
                    model_output,
                    t,
                    latents,
                    generator=generator,
                    variance_noise=noise,
                    guidance_gradient=gradient,
                    use_ddim=use_ddim,
                    eta=eta,
                )
            else:
                eps = model_output[:, : latents.shape[1]]
                if gradient is not None:
                    alpha_bar = scheduler.alphas_cumprod.to(latents.device)[int(t)].float()
                    eps = eps - (1 - alpha_bar).sqrt() * gradient
                extra = {"generator": generator} if accepts_generator else {}
                out = scheduler.step(eps, t, latents, **extra)
            latents = out.prev_sample
            if callback_on_step_end is not None:
                available = {"latents": latents}
                if hasattr(out, "pred_original_sample"):
                    available["pred_original_sample"] = out.pred_original_sample
                callback_kwargs = {k: available[k] for k in callback_on_step_end_tensor_inputs}
                result = callback_on_step_end(pipe, i, t, callback_kwargs) or {}
                latents = result.get("latents", latents)
            bar.update()
    return latents


class ClassifierGuidedPipeline(DiffusionPipeline):
    r"""Class-conditional sampling with an ADM UNet, guided by a noisy classifier (ADM-G).

    Components: ``unet`` (:class:`ADMUNet2DModel`), ``scheduler`` (:class:`ADMScheduler`, or a
    diffusers solver such as DDIM / DPM-Solver++ / UniPC), optional ``classifier``
    (:class:`ADMClassifierModel`). ``id2label`` maps class ids to names ("tench, Tinca tinca") and
    ``recommended_classifier_scale`` records the scale the model was published with (the CLI's
    default); both are saved in ``model_index.json``.
    """

    model_cpu_offload_seq = "classifier->unet"
    _optional_components = ["classifier"]
    _callback_tensor_inputs = ["latents", "pred_original_sample"]

    def __init__(
        self,
        unet,
        scheduler,
        classifier=None,
        id2label: dict | None = None,
        recommended_classifier_scale: float | None = None,
    ):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, classifier=classifier)
        id2label = {int(k): str(v) for k, v in (id2label or {}).items()}
        self.register_to_config(id2label=id2label or None, recommended_classifier_scale=recommended_classifier_scale)
        self._check_components()

    @property
    def id2label(self) -> dict[int, str]:
        return {int(k): v for k, v in (self.config.id2label or {}).items()}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load from a local folder or a Hub repo id (snapshot downloaded first)."""
        path = resolve_pretrained_path(pretrained_model_name_or_path, kwargs)
        return super().from_pretrained(path, **kwargs)

    # ---------------------------------------------------------------------------------------------
    def _check_components(self):
        unet, classifier = self.unet, self.classifier
        if unet is None or classifier is None:
            return
        u, c = unet.config, classifier.config
        if (u.sample_size, u.in_channels) != (c.sample_size, c.in_channels):
            raise ValueError(
                f"classifier takes {c.in_channels}×{c.sample_size}² images but the unet makes "
                f"{u.in_channels}×{u.sample_size}²; pair models of the same resolution"
            )
        if u.num_classes is not None and u.num_classes != c.num_classes:
            raise ValueError(
                f"the unet has {u.num_classes} classes and the classifier {c.num_classes}; pair models trained on the same labels"
            )

    @property
    def num_classes(self) -> int | None:
        if self.unet.config.num_classes is not None:
            return self.unet.config.num_classes
        return self.classifier.config.num_classes if self.classifier is not None else None

    def get_label_ids(self, labels) -> list[int]:
        """Class ids for names or ids. A name matches any comma-separated synonym of a class,
        case-insensitively ("golden retriever" → 207); unknown names raise listing close matches."""
        if isinstance(labels, (str, int, np.integer)):
            labels = [labels]
        if isinstance(labels, torch.Tensor):
            labels = labels.reshape(-1).tolist()
        lookup: dict[str, list[int]] = {}
        for idx, names in self.id2label.items():
            for name in str(names).split(","):
                ids_for_name = lookup.setdefault(name.strip().lower(), [])
                if idx not in ids_for_name:
                    ids_for_name.append(idx)
        ids = []
        for label in labels:
            if isinstance(label, str) and not label.strip().lstrip("-").isdigit():
                key = label.strip().lower()
                if key not in lookup:
                    if not lookup:
                        raise ValueError(f"label {label!r} is a name, but this pipeline has no id2label; pass class ids")
                    close = difflib.get_close_matches(key, lookup, n=5)
                    hint = f"; close matches: {', '.join(close)}" if close else ""
                    raise ValueError(f"unknown class name {label!r}{hint}")
                if len(lookup[key]) > 1:
                    options = "; ".join(f"{i}: {self.id2label[i]}" for i in lookup[key])
                    raise ValueError(f"class name {label!r} is ambiguous ({options}); pass the id or a longer name")
                ids.append(lookup[key][0])
            else:
                ids.append(int(label))
        n = self.num_classes
        for i in ids:
            if n is None or not 0 <= i < n:
                raise ValueError(
                    f"class label {i} is out of range: this pipeline has {n or 0} classes (ids 0..{(n or 0) - 1})"
                )
        return ids

    def _prepare_labels(self, class_labels, num_images, generator, device):
        conditional = self.unet.config.num_classes is not None
        if class_labels is None:
            n = 1 if num_images is None else int(num_images)
            if not conditional and self.classifier is None:
                return None, n
            if self.num_classes is None:
                return None, n
            # A class-conditional model (or a classifier) without labels: uniform random labels.
            gen = generator[0] if isinstance(generator, list) else generator
            labels = torch.randint(0, self.num_classes, (n,), generator=gen, device=gen.device if gen else "cpu")
            return labels.to(device), n
        if not conditional and self.classifier is None:
            raise ValueError("class_labels were given, but the unet is unconditional and there is no classifier")
        ids = self.get_label_ids(class_labels)
        if num_images is not None and len(ids) != num_images:
            if len(ids) != 1:
                raise ValueError(f"got {len(ids)} class_labels for num_images={num_images}; give one label or one per image")
            ids = ids * int(num_images)
        return torch.tensor(ids, dtype=torch.long, device=device), len(ids)

    def _cond_fn(self, labels, classifier_scale):
        classifier = self.classifier

        def cond_fn(x, t):
            with torch.enable_grad():
                x_in = x.detach().requires_grad_(True)
                log_probs = F.log_softmax(classifier(x_in, t), dim=-1)
                selected = log_probs[torch.arange(len(labels), device=x.device), labels]
                return torch.autograd.grad(selected.sum(), x_in)[0].float() * classifier_scale

        return cond_fn

    @torch.no_grad()
    def __call__(
        self,
        class_labels=None,
        num_images: int | None = None,
        classifier_scale: float = 1.0,
        num_inference_steps: int = 250,
        respacing: str | None = None,
        use_ddim: bool = False,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        step_noise: torch.Tensor | Callable | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
    ):
        r"""Sample images of ``class_labels`` (ids or names; random when ``None`` for a
        class-conditional model) with guidance scale ``classifier_scale`` (0 disables guidance).

        ``respacing`` takes the original strings (``"250"``, ``"ddim25"``); otherwise
        ``num_inference_steps`` evenly spaced steps. ``use_ddim``/``eta`` select DDIM. ``latents`` is
        x_T; ``step_noise`` the noise of every step — a tensor (steps, N, C, H, W) or a callable
        ``(i, t) -> tensor`` — to reproduce a trajectory exactly. ``output_type``: "pil", "np",
        "pt" (images in [0, 1]) or "latent" (model space, [-1, 1])."""
        check_sampling_inputs(self, output_type, callback_on_step_end_tensor_inputs, eta)
        if classifier_scale is None or classifier_scale < 0:
            raise ValueError(f"classifier_scale must be ≥ 0; got {classifier_scale}")
        if classifier_scale > 0 and self.classifier is None:
            raise ValueError(
                f"classifier_scale={classifier_scale} needs a classifier, and this pipeline has none; "
                "pass classifier_scale=0 or load a pipeline with a classifier"
            )
        self._check_components()
        device = self._execution_device
        if latents is not None and num_images is None and class_labels is None:
            num_images = latents.shape[0]
        labels, n = self._prepare_labels(class_labels, num_images, generator, device)
        latents = prepare_sampling(self, n, generator, latents, num_inference_steps, respacing, use_ddim, device)

        unet_labels = labels if self.unet.config.num_classes is not None else None

        def model_fn(x, t):
            x = self.scheduler.scale_model_input(x, t)
            return self.unet(x, t, class_labels=unet_labels).sample

        cond_fn = None
        saved = None
        if classifier_scale > 0:
            # The classifier's own parameters need no gradients while sampling.
            saved = [p.requires_grad for p in self.classifier.parameters()]
            self.classifier.requires_grad_(False)
            cond_fn = self._cond_fn(labels, classifier_scale)
        try:
            latents = denoise(
                self,
                latents,
                model_fn,
                cond_fn,
                use_ddim,
                eta,
                generator,
                step_noise,
                callback_on_step_end,
                callback_on_step_end_tensor_inputs,
            )
        finally:
            if saved is not None:
                for p, flag in zip(self.classifier.parameters(), saved):
                    p.requires_grad_(flag)
        self.maybe_free_model_hooks()
        images = postprocess(latents, output_type, self)
        if not return_dict:
            return (images, labels)
        return ClassifierGuidedPipelineOutput(images=images, class_labels=labels)
