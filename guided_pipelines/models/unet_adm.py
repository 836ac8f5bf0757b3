"""ADM: the ablated diffusion model UNet (Dhariwal & Nichol 2021, Sec. 3) and its super-resolution
variant ADM-U (Appendix A)."""

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import register_to_config
# diffusers' pipeline loader looks a component's base class up by name in the component's module.
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn

from .modeling_adm import ADMModelMixin
from .blocks import (
    AttentionBlock,
    ResBlock,
    TimestepEmbedSequential,
    Upsample,
    build_encoder,
    norm_silu,
    normalization,
    run_block,
    timestep_embedding,
)


class ADMUNet2DModel(ADMModelMixin):
    r"""The ADM UNet ε_θ(x_t, t, y).

    Predicts the noise ε (first ``in_channels`` outputs) and, with ``out_channels = 2·in_channels``,
    the interpolation weight v of the learned variance Σ_θ = exp(v·log β_t + (1 − v)·log β̃_t)
    (Nichol & Dhariwal 2021, Eq. 15). ``attention_resolutions`` are downsample rates (attention where
    the feature map is ``sample_size / ds``); ``channel_mult`` may be fractional (the 512 model starts
    at 0.5). Parameter names match the original checkpoints.
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int = 64,
        in_channels: int = 3,
        model_channels: int = 128,
        out_channels: int = 6,
        num_res_blocks: int = 2,
        attention_resolutions: tuple = (2, 4, 8),
        dropout: float = 0.0,
        channel_mult: tuple = (1, 2, 3, 4),
        conv_resample: bool = True,
        num_classes: int | None = None,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
    ):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        time_embed_dim = model_channels * 4
        self.gradient_checkpointing = False
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)
        self.input_blocks, self.middle_block, input_block_chans, ch, ds, _ = build_encoder(
            model_channels,
            in_channels,
            num_res_blocks,
            attention_resolutions,
            dropout,
            channel_mult,
            conv_resample,
            num_heads,
            num_head_channels,
            use_scale_shift_norm,
            resblock_updown,
            use_new_attention_order,
        )
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                skip_ch = input_block_chans.pop()
                out_ch = int(model_channels * mult)
                layers = [
                    ResBlock(
                        ch + skip_ch,
                        time_embed_dim,
                        dropout,
                        out_channels=out_ch,
                        use_scale_shift_norm=use_scale_shift_norm,
                    )
                ]
                ch = out_ch
                if ds in attention_resolutions:
                    layers.append(
                        AttentionBlock(ch, num_heads_upsample, num_head_channels, use_new_attention_order)
                    )
                if level and i == num_res_blocks:
                    if resblock_updown:
                        layers.append(
                            ResBlock(ch, time_embed_dim, dropout, ch, use_scale_shift_norm=use_scale_shift_norm, up=True)
                        )
                    else:
                        layers.append(Upsample(ch, conv_resample, out_channels=ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        input_ch = int(channel_mult[0] * model_channels)
        self.out = nn.Sequential(normalization(ch), nn.SiLU(), nn.Conv2d(input_ch, out_channels, 3, padding=1))

    def _check_labels(self, sample: torch.Tensor, class_labels):
        if self.config.num_classes is None:
            if class_labels is not None:
                raise ValueError("this model is unconditional (num_classes=None): pass class_labels=None")
            return None
        if class_labels is None:
            raise ValueError(f"this model is class-conditional ({self.config.num_classes} classes): pass class_labels")
        class_labels = torch.as_tensor(class_labels, device=sample.device).reshape(-1)
        if class_labels.shape[0] != sample.shape[0]:
            raise ValueError(f"got {class_labels.shape[0]} class labels for a batch of {sample.shape[0]}")
        if class_labels.numel() and (class_labels.min() < 0 or class_labels.max() >= self.config.num_classes):
            raise ValueError(f"class labels must lie in [0, {self.config.num_classes - 1}]")
        return class_labels

    def _embed(self, sample, timestep, class_labels):
        timestep = torch.as_tensor(timestep, device=sample.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(sample.shape[0])
        emb = self.time_embed(timestep_embedding(timestep, self.config.model_channels).to(self.dtype))
        class_labels = self._check_labels(sample, class_labels)
        if class_labels is not None:
            emb = emb + self.label_emb(class_labels)
        return emb

    def _unet(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.input_blocks:
            h = run_block(self, block, h, emb)
            skips.append(h)
        h = run_block(self, self.middle_block, h, emb)
        for block in self.output_blocks:
            h = run_block(self, block, torch.cat([h, skips.pop()], dim=1), emb)
        norm, _, conv = self.out
        return conv(norm_silu(norm, h))

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | int,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ):
        """``sample`` (N, C, H, W) in model space, ``timestep`` original-scale indices (N,) or a scalar,
        ``class_labels`` (N,) ints for a class-conditional model."""
        emb = self._embed(sample, timestep, class_labels)
        out = self._unet(sample.to(self.dtype), emb)
        return UNet2DOutput(sample=out) if return_dict else (out,)


class ADMSuperResUNet2DModel(ADMUNet2DModel):
    """ADM-U: the ADM UNet conditioned on a low-resolution image, upsampled bilinearly
    (``align_corners=False``) to the sample size and concatenated to the channels of x_t.

    ``in_channels`` is the channel count of x_t; the first convolution takes twice that."""

    @register_to_config
    def __init__(
        self,
        sample_size: int = 256,
        in_channels: int = 3,
        model_channels: int = 192,
        out_channels: int = 6,
        num_res_blocks: int = 2,
        attention_resolutions: tuple = (8, 16, 32),
        dropout: float = 0.0,
        channel_mult: tuple = (1, 1, 2, 2, 4, 4),
        conv_resample: bool = True,
        num_classes: int | None = None,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        low_res_size: int | None = None,
    ):
        super().__init__(
            sample_size=sample_size,
            in_channels=in_channels * 2,
            model_channels=model_channels,
            out_channels=out_channels,
            num_res_blocks=num_res_blocks,
            attention_resolutions=attention_resolutions,
            dropout=dropout,
            channel_mult=channel_mult,
            conv_resample=conv_resample,
            num_classes=num_classes,
            num_heads=num_heads,
            num_head_channels=num_head_channels,
            num_heads_upsample=num_heads_upsample,
            use_scale_shift_norm=use_scale_shift_norm,
            resblock_updown=resblock_updown,
            use_new_attention_order=use_new_attention_order,
        )
        # The parent's register_to_config recorded the doubled channel count; restore this class's.
        self.register_to_config(in_channels=in_channels, low_res_size=low_res_size)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | int,
        low_res: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ):
        if low_res.ndim != 4 or low_res.shape[0] != sample.shape[0] or low_res.shape[1] != sample.shape[1]:
            raise ValueError(
                f"low_res must be (N, {sample.shape[1]}, h, w) matching the sample batch; got {tuple(low_res.shape)}"
            )
        upsampled = F.interpolate(low_res.to(sample.dtype), sample.shape[-2:], mode="bilinear", align_corners=False)
        emb = self._embed(sample, timestep, class_labels)
        out = self._unet(torch.cat([sample, upsampled], dim=1).to(self.dtype), emb)
        return UNet2DOutput(sample=out) if return_dict else (out,)
