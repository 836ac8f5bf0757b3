"""Shared test fixtures: the reference data folder and the small models of the original implementation."""

import json
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES


def _forward(model, inputs: dict, dtype=None, memory_format=torch.contiguous_format):
    """Run any of the three model classes on a fixture's inputs (images cast to ``dtype`` and
    ``memory_format``); returns the output."""
    from guided_pipelines.models import ADMClassifierModel, ADMSuperResUNet2DModel

    def image(key):
        return inputs[key].to(dtype=dtype, memory_format=memory_format)

    if isinstance(model, ADMClassifierModel):
        return model(image("x"), inputs["t"])
    if isinstance(model, ADMSuperResUNet2DModel):
        return model(image("x"), inputs["t"], image("low_res"), class_labels=inputs.get("y")).sample
    return model(image("x"), inputs["t"], class_labels=inputs.get("y")).sample


@pytest.fixture
def fixture_model():
    """``load(name) -> (model, inputs, forward)``: fixture model ``name`` (``fixtures/models/NAME.json``)
    built through ``model_from_original`` with the original weights (float32, eval mode); ``inputs``
    holds the original forward's ``x``, ``t``, ``y``, ``low_res`` and ``output``; ``forward(model,
    dtype=None, memory_format=torch.contiguous_format)`` runs a model of that kind on those inputs."""
    from safetensors.torch import load_file

    from guided_pipelines.conversion import model_from_original

    def load(name: str):
        config = json.loads((FIXTURES / "models" / f"{name}.json").read_text())
        kind = config.pop("kind")
        model = model_from_original(kind, load_file(FIXTURES / "models" / f"{name}.safetensors"), **config)
        inputs = load_file(FIXTURES / "models" / f"{name}.io.safetensors")
        return model, inputs, lambda m, **kwargs: _forward(m, inputs, **kwargs)

    return load
