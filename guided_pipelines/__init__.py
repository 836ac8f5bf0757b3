"""guided_pipelines: diffusers-native ADM, classifier guidance and ADM-U (Dhariwal & Nichol 2021).

Names are imported lazily, so light modules (``guided_pipelines.metrics``) load without diffusers."""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "ADMUNet2DModel": "guided_pipelines.models",
    "ADMSuperResUNet2DModel": "guided_pipelines.models",
    "ADMClassifierModel": "guided_pipelines.models",
    "ADMScheduler": "guided_pipelines.schedulers",
    "ClassifierGuidedPipeline": "guided_pipelines.pipelines",
    "ADMUpsamplePipeline": "guided_pipelines.pipelines",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'guided_pipelines' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
