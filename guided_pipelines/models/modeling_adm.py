"""What the three ADM models share as diffusers models."""

import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.modeling_utils import ModelMixin


class ADMModelMixin(ModelMixin, ConfigMixin):
    _supports_gradient_checkpointing = True

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """diffusers' loader, then every tensor moved to a fresh allocation: weights memory-mapped from
        safetensors sit at unaligned offsets, where CPU kernels take other code paths and round
        differently, so a reloaded model would not sample bit-identically to the saved one."""
        model = super().from_pretrained(*args, **kwargs)
        with torch.no_grad():
            for tensor in list(model.parameters()) + list(model.buffers()):
                if tensor.device.type == "cpu":
                    tensor.data = tensor.data.clone()
        return model
