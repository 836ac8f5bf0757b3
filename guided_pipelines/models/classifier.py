"""The noisy classifier p_φ(y | x_t, t) of classifier guidance (Dhariwal & Nichol 2021, Sec. 4): the
downsampling half of the ADM UNet followed by a pooling head."""

import torch
from diffusers.configuration_utils import register_to_config
# diffusers' pipeline loader looks a component's base class up by name in the component's module.
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401
from torch import nn

from .modeling_adm import ADMModelMixin
from .blocks import AttentionPool2d, build_encoder, normalization, run_block, timestep_embedding

POOLS = ("adaptive", "attention", "spatial", "spatial_v2")


class ADMClassifierModel(ADMModelMixin):
    """Half-UNet classifier on noisy images. ``pool``: ``"attention"`` (the released classifiers),
    ``"adaptive"`` (global average), ``"spatial"``/``"spatial_v2"`` (MLP on the spatial means of every
    block's output). ``forward(sample, timestep)`` returns logits (N, num_classes)."""

    @register_to_config
    def __init__(
        self,
        sample_size: int = 64,
        in_channels: int = 3,
        model_channels: int = 128,
        num_classes: int = 1000,
        num_res_blocks: int = 2,
        attention_resolutions: tuple = (2, 4, 8),
        dropout: float = 0.0,
        channel_mult: tuple = (1, 2, 3, 4),
        conv_resample: bool = True,
        num_heads: int = 1,
        num_head_channels: int = 64,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        pool: str = "attention",
    ):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"unknown pool {pool!r}; choose one of {', '.join(POOLS)}")
        time_embed_dim = model_channels * 4
        self.gradient_checkpointing = False
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )
        self.input_blocks, self.middle_block, _, ch, ds, feature_size = build_encoder(
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
        if pool == "adaptive":
            self.out = nn.Sequential(
                normalization(ch), nn.SiLU(), nn.AdaptiveAvgPool2d((1, 1)), nn.Conv2d(ch, num_classes, 1), nn.Flatten()
            )
        elif pool == "attention":
            if num_head_channels == -1:
                raise ValueError("pool='attention' needs num_head_channels (channels per head), not -1")
            self.out = nn.Sequential(
                normalization(ch), nn.SiLU(), AttentionPool2d(sample_size // ds, ch, num_head_channels, num_classes)
            )
        elif pool == "spatial":
            self.out = nn.Sequential(nn.Linear(feature_size, 2048), nn.ReLU(), nn.Linear(2048, num_classes))
        else:
            self.out = nn.Sequential(
                nn.Linear(feature_size, 2048), normalization(2048), nn.SiLU(), nn.Linear(2048, num_classes)
            )

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int) -> torch.Tensor:
        """Logits of p_φ(y | x_t) for ``sample`` x_t at original-scale ``timestep`` t."""
        timestep = torch.as_tensor(timestep, device=sample.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(sample.shape[0])
        emb = self.time_embed(timestep_embedding(timestep, self.config.model_channels).to(self.dtype))
        spatial = self.config.pool.startswith("spatial")
        means = []
        h = sample.to(self.dtype)
        for block in self.input_blocks:
            h = run_block(self, block, h, emb)
            if spatial:
                means.append(h.mean(dim=(2, 3)))
        h = run_block(self, self.middle_block, h, emb)
        if spatial:
            means.append(h.mean(dim=(2, 3)))
            h = torch.cat(means, dim=-1)
        return self.out(h)
