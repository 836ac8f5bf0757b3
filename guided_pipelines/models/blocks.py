"""Building blocks shared by the ADM UNet, the super-resolution UNet and the noisy classifier.

Module and parameter names follow the original implementation (Dhariwal & Nichol 2021, Appendix A),
so that a released ``state_dict`` loads without renaming: ``in_layers.0`` is the first GroupNorm of a
residual block, ``qkv`` the 1×1 projection of an attention block, and so on.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding of (original-scale) timesteps: ``[cos(t·f_i), sin(t·f_i)]``,
    ``f_i = max_period^(-i/half)`` (Vaswani et al. 2017, as used by Ho et al. 2020)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32) computed in float32 whatever the parameter/activation dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return super().forward(x)
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    return GroupNorm32(32, channels)


class TimestepEmbedSequential(nn.Sequential):
    """A sequence whose residual blocks also receive the timestep (+ class) embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour ×2 upsampling, optionally followed by a 3×3 convolution."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(self.channels, self.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = upsample_nearest_2x(x)
        return self.conv(x) if self.use_conv else x


def upsample_nearest_2x(x: torch.Tensor) -> torch.Tensor:
    """``F.interpolate(x, scale_factor=2, mode="nearest")``, bit for bit, as one strided copy (many times
    faster on CPU); keeps ``x``'s memory format (NCHW or channels-last)."""
    b, c, h, w = x.shape
    if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
        return x[:, :, :, None, :, None].expand(b, c, h, 2, w, 2).reshape(b, c, 2 * h, 2 * w)
    nhwc = x.permute(0, 2, 3, 1)[:, :, None, :, None, :].expand(b, h, 2, w, 2, c)
    return nhwc.reshape(b, 2 * h, 2 * w, c).permute(0, 3, 1, 2)


def norm_silu(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """SiLU(norm(x)), in place on the fresh norm output when autograd does not need it."""
    h = norm(x)
    return F.silu(h, inplace=not h.requires_grad)


class Downsample(nn.Module):
    """×2 downsampling: a stride-2 3×3 convolution, or 2×2 average pooling."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        if use_conv:
            self.op = nn.Conv2d(self.channels, self.out_channels, 3, stride=2, padding=1)
        else:
            if self.channels != self.out_channels:
                raise ValueError("average-pool downsampling cannot change the channel count")
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(nn.Module):
    """Residual block conditioned on the embedding. With scale-shift norm (ADM's "adaptive group
    normalization", Sec. 3) the embedding gives (y_s, y_b) and h = GroupNorm(h)·(1 + y_s) + y_b;
    otherwise it is added to h. ``up``/``down`` resample inside the block (BigGAN-style)."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, self.out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd = Upsample(channels, False)
            self.x_upd = Upsample(channels, False)
        elif down:
            self.h_upd = Downsample(channels, False)
            self.x_upd = Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels),
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # The Sequentials keep the original parameter names; they are run step by step so that the
        # activations can work in place on fresh tensors when no gradient is recorded.
        norm, _, conv = self.in_layers
        h = norm_silu(norm, x)
        if self.updown:
            h = self.h_upd(h)
            x = self.x_upd(x)
        h = conv(h)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        out_norm, _, dropout, out_conv = self.out_layers
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = out_norm(h)
            if h.requires_grad:
                h = F.silu(h * (1 + scale) + shift)
            else:
                h = F.silu(h.mul_(1 + scale).add_(shift), inplace=True)
        else:
            h = norm_silu(out_norm, h + emb_out)
        h = out_conv(dropout(h))
        skip = self.skip_connection(x)
        return skip + h if h.requires_grad else h.add_(skip)


def qkv_attention(qkv: torch.Tensor, num_heads: int, legacy_order: bool) -> torch.Tensor:
    """Multi-head softmax(q·kᵀ/√d)·v over the flattened spatial positions.

    ``qkv`` is (B, L, 3·H·d), channels last, so that q, k, v reach the fused attention kernel with unit
    stride along d. The "legacy" order (released ImageNet 128/256/512 models) stores each head's q, k, v
    together (per head: q_h, k_h, v_h); the "new" order stores all queries, then all keys, then all
    values. Returns (B, L, H·d)."""
    batch, length, width = qkv.shape
    ch = width // (3 * num_heads)
    if legacy_order:
        q, k, v = qkv.reshape(batch, length, num_heads, 3 * ch).transpose(1, 2).split(ch, dim=-1)
    else:
        q, k, v = (part.reshape(batch, length, num_heads, ch).transpose(1, 2) for part in qkv.chunk(3, dim=-1))
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(batch, length, num_heads * ch)


def _pointwise(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """A kernel-size-1 ``Conv1d`` applied to channels-last ``x`` (B, L, C_in) as a matrix product."""
    return F.linear(x, conv.weight[:, :, 0], conv.bias)


class AttentionBlock(nn.Module):
    """Self-attention over spatial positions with a residual connection. Heads come from a fixed
    count (``num_head_channels=-1``) or from channels per head (ADM's 64 channels per head).

    ``qkv`` and ``proj_out`` keep the original 1×1 ``Conv1d`` parameters; they are applied as matrix
    products on the channels-last (B, L, C) sequence."""

    def __init__(
        self, channels: int, num_heads: int = 1, num_head_channels: int = -1, use_new_attention_order: bool = False
    ):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"{channels} channels are not divisible by num_head_channels={num_head_channels}")
            self.num_heads = channels // num_head_channels
        self.legacy_order = not use_new_attention_order
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        h = self.norm(x).reshape(b, c, -1).transpose(1, 2).contiguous()  # (B, L, C); a view if channels-last
        h = _pointwise(self.proj_out, qkv_attention(_pointwise(self.qkv, h), self.num_heads, self.legacy_order))
        return x + h.transpose(1, 2).reshape(b, c, *spatial)  # the sum keeps x's memory format


class AttentionPool2d(nn.Module):
    """CLIP-style attention pooling: the mean token (plus a learned positional embedding) attends to
    all positions; its output is projected to the logits."""

    def __init__(self, spacial_dim: int, embed_dim: int, num_heads_channels: int, output_dim: int | None = None):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(embed_dim, spacial_dim**2 + 1) / embed_dim**0.5)
        self.qkv_proj = nn.Conv1d(embed_dim, 3 * embed_dim, 1)
        self.c_proj = nn.Conv1d(embed_dim, output_dim or embed_dim, 1)
        self.num_heads = embed_dim // num_heads_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        x = x.reshape(b, c, -1)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)
        x = (x + self.positional_embedding[None].to(x.dtype)).transpose(1, 2).contiguous()
        x = qkv_attention(_pointwise(self.qkv_proj, x), self.num_heads, legacy_order=False)
        return _pointwise(self.c_proj, x[:, 0])  # only the mean token's output is used


def build_encoder(
    model_channels: int,
    in_channels: int,
    num_res_blocks: int,
    attention_resolutions,
    dropout: float,
    channel_mult,
    conv_resample: bool,
    num_heads: int,
    num_head_channels: int,
    use_scale_shift_norm: bool,
    resblock_updown: bool,
    use_new_attention_order: bool,
):
    """The downsampling half and middle block shared by the UNet and the classifier.

    Returns ``(input_blocks, middle_block, input_block_chans, ch, ds, feature_size)`` exactly as the
    original constructors lay them out (``attention_resolutions`` are downsample rates)."""
    time_embed_dim = model_channels * 4
    ch = int(channel_mult[0] * model_channels)
    input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
    input_block_chans = [ch]
    feature_size = ch
    ds = 1
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            out_ch = int(mult * model_channels)
            layers = [
                ResBlock(ch, time_embed_dim, dropout, out_channels=out_ch, use_scale_shift_norm=use_scale_shift_norm)
            ]
            ch = out_ch
            if ds in attention_resolutions:
                layers.append(AttentionBlock(ch, num_heads, num_head_channels, use_new_attention_order))
            input_blocks.append(TimestepEmbedSequential(*layers))
            feature_size += ch
            input_block_chans.append(ch)
        if level != len(channel_mult) - 1:
            if resblock_updown:
                down = ResBlock(ch, time_embed_dim, dropout, ch, use_scale_shift_norm=use_scale_shift_norm, down=True)
            else:
                down = Downsample(ch, conv_resample, out_channels=ch)
            input_blocks.append(TimestepEmbedSequential(down))
            input_block_chans.append(ch)
            ds *= 2
            feature_size += ch
    middle_block = TimestepEmbedSequential(
        ResBlock(ch, time_embed_dim, dropout, use_scale_shift_norm=use_scale_shift_norm),
        AttentionBlock(ch, num_heads, num_head_channels, use_new_attention_order),
        ResBlock(ch, time_embed_dim, dropout, use_scale_shift_norm=use_scale_shift_norm),
    )
    feature_size += ch
    return input_blocks, middle_block, input_block_chans, ch, ds, feature_size


def run_block(model: nn.Module, block: nn.Module, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """Run one block, through activation checkpointing when the model has it enabled and grads are on."""
    if getattr(model, "gradient_checkpointing", False) and torch.is_grad_enabled():
        return model._gradient_checkpointing_func(block, h, emb)
    return block(h, emb)
