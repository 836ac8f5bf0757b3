"""ADM-U: diffusion upsampling of low-resolution images (Dhariwal & Nichol 2021, Sec. 5 / Appendix A;
the released 64→256 and 128→512 upsamplers)."""

from __future__ import annotations

from typing import Callable

import numpy as np
import PIL.Image
import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline

from .pipeline_classifier_guided import (
    ClassifierGuidedPipelineOutput,
    check_sampling_inputs,
    denoise,
    postprocess,
    prepare_sampling,
    resolve_pretrained_path,
)


def low_res_to_tensor(images, channels: int) -> torch.Tensor:
    """Low-resolution images → (N, C, h, w) float in [-1, 1].

    Accepts PIL images (one or a list), uint8 numpy NHWC (the original ``.npz`` ``arr_0``), float numpy
    NHWC in [0, 1] (diffusers' ``output_type="np"``), or a tensor NCHW already in [-1, 1]."""
    if isinstance(images, PIL.Image.Image):
        images = [images]
    if isinstance(images, list) and images and isinstance(images[0], PIL.Image.Image):
        mode = "L" if channels == 1 else "RGB"
        images = np.stack([np.asarray(im.convert(mode)) for im in images])
        if images.ndim == 3:
            images = images[..., None]
    if isinstance(images, np.ndarray):
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != channels:
            raise ValueError(f"numpy low_res must be NHWC with {channels} channels; got shape {images.shape}")
        if images.dtype == np.uint8:
            tensor = torch.from_numpy(images.astype(np.float32) / 127.5 - 1)
        else:
            if images.min() < 0 or images.max() > 1:
                raise ValueError("float numpy low_res must lie in [0, 1] (or pass uint8, or a tensor in [-1, 1])")
            tensor = torch.from_numpy(images.astype(np.float32)) * 2 - 1
        return tensor.permute(0, 3, 1, 2).contiguous()
    if isinstance(images, torch.Tensor):
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[1] != channels:
            raise ValueError(f"tensor low_res must be (N, {channels}, h, w) in [-1, 1]; got {tuple(images.shape)}")
        if images.min() < -1.0001 or images.max() > 1.0001:
            raise ValueError("tensor low_res must lie in [-1, 1]")
        return images.float()
    raise ValueError(f"low_res must be PIL images, a numpy array or a tensor; got {type(images).__name__}")


class ADMUpsamplePipeline(DiffusionPipeline):
    """Upsample ``low_res`` images with the ADM-U super-resolution UNet (:class:`ADMSuperResUNet2DModel`)
    and :class:`ADMScheduler` (or a diffusers solver)."""

    model_cpu_offload_seq = "unet"
    _callback_tensor_inputs = ["latents", "pred_original_sample"]

    def __init__(self, unet, scheduler, id2label: dict | None = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        id2label = {int(k): str(v) for k, v in (id2label or {}).items()}
        self.register_to_config(id2label=id2label or None)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load from a local folder or a Hub repo id (snapshot downloaded first)."""
        return super().from_pretrained(resolve_pretrained_path(pretrained_model_name_or_path, kwargs), **kwargs)

    @torch.no_grad()
    def __call__(
        self,
        low_res,
        class_labels=None,
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
        """High-resolution samples of ``low_res`` (and ``class_labels`` for a class-conditional
        upsampler). Options as :meth:`ClassifierGuidedPipeline.__call__`."""
        check_sampling_inputs(self, output_type, callback_on_step_end_tensor_inputs, eta)
        config = self.unet.config
        device = self._execution_device
        low = low_res_to_tensor(low_res, config.in_channels).to(device)
        n = low.shape[0]
        if config.low_res_size is not None and tuple(low.shape[-2:]) != (config.low_res_size,) * 2:
            raise ValueError(
                f"this upsampler takes {config.low_res_size}×{config.low_res_size} inputs; got "
                f"{low.shape[-2]}×{low.shape[-1]}"
            )
        labels = None
        if config.num_classes is not None:
            if class_labels is None:
                raise ValueError(f"this upsampler is class-conditional ({config.num_classes} classes): pass class_labels")
            labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1).to(device)
            if labels.shape[0] == 1 and n > 1:
                labels = labels.expand(n)
            if labels.shape[0] != n:
                raise ValueError(f"got {labels.shape[0]} class_labels for {n} low-resolution images")
            if labels.min() < 0 or labels.max() >= config.num_classes:
                raise ValueError(f"class labels must lie in [0, {config.num_classes - 1}]")
        elif class_labels is not None:
            raise ValueError("this upsampler is unconditional: pass class_labels=None")
        latents = prepare_sampling(self, n, generator, latents, num_inference_steps, respacing, use_ddim, device)

        def model_fn(x, t):
            return self.unet(self.scheduler.scale_model_input(x, t), t, low, class_labels=labels).sample

        latents = denoise(
            self,
            latents,
            model_fn,
            None,
            use_ddim,
            eta,
            generator,
            step_noise,
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
        )
        self.maybe_free_model_hooks()
        images = postprocess(latents, output_type, self)
        if not return_dict:
            return (images, labels)
        return ClassifierGuidedPipelineOutput(images=images, class_labels=labels)
