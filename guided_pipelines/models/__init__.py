from .classifier import ADMClassifierModel
from .unet_adm import ADMSuperResUNet2DModel, ADMUNet2DModel

__all__ = ["ADMUNet2DModel", "ADMSuperResUNet2DModel", "ADMClassifierModel"]
