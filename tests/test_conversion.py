"""Conversion of original checkpoints: the 15 released architectures, the .pt path, the ``convert`` CLI
and the error messages for checkpoints that do not fit."""

import functools
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from guided_pipelines import cli, conversion
from guided_pipelines.conversion import (
    PRESETS,
    convert_checkpoint,
    infer_preset,
    kwargs_from_flags,
    load_checkpoint,
    load_original_state_dict,
    model_from_original,
    preset_model,
)
from guided_pipelines.models import ADMClassifierModel, ADMUNet2DModel
from guided_pipelines.pipelines import ADMUpsamplePipeline, ClassifierGuidedPipeline

FIXTURES = Path(__file__).parent / "fixtures"
RELEASED = json.loads((FIXTURES / "released_checkpoints.json").read_text())


def _meta_state_dict(shapes: dict) -> dict:
    """A state_dict of empty meta tensors: enough for every shape check, no memory."""
    return {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}


@pytest.fixture
def cached_presets(monkeypatch):
    """Build each preset's meta model once per test (``infer_preset`` compares against all 15)."""
    monkeypatch.setattr(conversion, "preset_shapes", functools.lru_cache(conversion.preset_shapes))


# ---------------------------------------------------------------------------------------------------
# The released checkpoints


def test_presets_are_the_released_checkpoints():
    assert len(RELEASED) == 15
    assert set(PRESETS) == set(RELEASED)


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_checkpoint_architecture(name):
    released = RELEASED[name]
    assert PRESETS[name]["kind"] == released["kind"]
    # The preset's flags and the flags the checkpoint was trained with give the same constructor call.
    assert kwargs_from_flags(released["kind"], PRESETS[name]["flags"]) == kwargs_from_flags(
        released["kind"], released["flags"]
    )
    state = preset_model(name, device="meta").state_dict()
    shapes = {key: tuple(value.shape) for key, value in state.items()}
    expected = {key: tuple(shape) for key, shape in released["state_dict"].items()}
    assert sorted(set(expected) - set(shapes)) == [], "keys the model lacks"
    assert sorted(set(shapes) - set(expected)) == [], "keys the checkpoint lacks"
    assert {k: (shapes[k], expected[k]) for k in shapes if shapes[k] != expected[k]} == {}
    assert sum(value.numel() for value in state.values()) == released["params"]


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_checkpoint_is_recognised(name, cached_presets):
    state_dict = _meta_state_dict(RELEASED[name]["state_dict"])
    assert infer_preset(state_dict, file_name=f"/downloads/{name}") == name
    # Without the file name the keys decide: the LSUN models share one architecture.
    inferred = infer_preset(state_dict)
    assert conversion.preset_shapes(inferred) == conversion.preset_shapes(name)
    assert PRESETS[inferred]["kind"] == PRESETS[name]["kind"]


# ---------------------------------------------------------------------------------------------------
# The .pt path and the CLI


def test_load_checkpoint_reads_original_pt():
    state_dict = load_checkpoint(str(FIXTURES / "models" / "unet_uncond16.pt"))
    reference = load_file(FIXTURES / "models" / "unet_uncond16.safetensors")
    assert state_dict.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(state_dict[key].float(), value.float()), key


def _convert(*args: str) -> int:
    return cli.main(["convert", *map(str, args)])


def test_cli_converts_checkpoint_with_explicit_architecture(tmp_path, fixture_model, capsys):
    models = FIXTURES / "models"
    out = tmp_path / "converted"
    checkpoint, config = models / "unet_uncond16.pt", models / "unet_uncond16.json"
    code = _convert("--checkpoint", checkpoint, "--config", config, "--output", out)
    assert code == 0, capsys.readouterr().err
    assert "unet_uncond16.json" in capsys.readouterr().out
    pipe = ClassifierGuidedPipeline.from_pretrained(out)
    assert pipe.classifier is None and pipe.id2label == {}
    assert pipe.scheduler.config.variance_type == "fixed_large"  # 3 output channels: fixed variance
    assert (pipe.scheduler.config.beta_schedule, pipe.scheduler.config.num_train_timesteps) == ("linear", 1000)
    reference, inputs, forward = fixture_model("unet_uncond16")
    with torch.no_grad():
        assert torch.equal(forward(pipe.unet.eval()), forward(reference))
    assert (forward(reference) - inputs["output"]).abs().max() <= 1e-5 * inputs["output"].abs().max()


def test_cli_bundles_classifier(tmp_path, fixture_model, capsys):
    models = FIXTURES / "models"
    out = tmp_path / "converted"
    code = _convert(
        "--checkpoint", models / "unet_cond32.safetensors", "--config", models / "unet_cond32.json",
        "--classifier", models / "classifier32.safetensors", "--classifier-config", models / "classifier32.json",
        "--noise-schedule", "cosine", "--diffusion-steps", "500", "--output", out,
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    pipe = ClassifierGuidedPipeline.from_pretrained(out)
    assert isinstance(pipe.unet, ADMUNet2DModel) and isinstance(pipe.classifier, ADMClassifierModel)
    config = pipe.scheduler.config
    assert (config.beta_schedule, config.num_train_timesteps, config.variance_type) == ("cosine", 500, "learned_range")
    assert pipe.config.recommended_classifier_scale is None and pipe.id2label == {}  # 10 classes: no names
    for name, model in (("unet_cond32", pipe.unet), ("classifier32", pipe.classifier)):
        reference, _, forward = fixture_model(name)
        with torch.no_grad():
            assert torch.equal(forward(model.eval()), forward(reference)), name


def test_cli_converts_superres_and_lone_classifier(tmp_path, fixture_model, capsys):
    models = FIXTURES / "models"
    for name in ("superres32", "classifier32"):
        code = _convert(
            "--checkpoint", models / f"{name}.safetensors", "--config", models / f"{name}.json",
            "--output", tmp_path / name,
        )  # fmt: skip
        assert code == 0, capsys.readouterr().err
    upsampler = ADMUpsamplePipeline.from_pretrained(tmp_path / "superres32")
    classifier = ADMClassifierModel.from_pretrained(tmp_path / "classifier32").eval()
    assert upsampler.unet.config.in_channels == 3 and upsampler.unet.config.low_res_size == 8
    for name, model in (("superres32", upsampler.unet.eval()), ("classifier32", classifier)):
        reference, _, forward = fixture_model(name)
        with torch.no_grad():
            assert torch.equal(forward(model), forward(reference)), name


@pytest.mark.parametrize(
    "preset, conditional, guided",
    [("64x64_diffusion.pt", True, True), ("256x256_diffusion_uncond.pt", False, True), ("lsun_cat.pt", False, False)],
)
def test_converted_pipeline_takes_the_preset_settings(preset, conditional, guided, tmp_path):
    tiny = dict(sample_size=8, model_channels=32, channel_mult=(1,), num_res_blocks=1, attention_resolutions=())
    unet = ADMUNet2DModel(**tiny, out_channels=6, num_classes=1000 if conditional else None)
    classifier = ADMClassifierModel(**tiny, num_classes=1000, num_head_channels=32, pool="adaptive") if guided else None
    conversion.write_converted(unet, preset, str(tmp_path), classifier=classifier)
    pipe = ClassifierGuidedPipeline.from_pretrained(tmp_path)
    settings = PRESETS[preset]
    config = pipe.scheduler.config
    assert (config.beta_schedule, config.num_train_timesteps) == (settings["beta_schedule"], 1000)
    assert config.variance_type == "learned_range"
    assert pipe.config.recommended_classifier_scale == settings.get("classifier_scale")
    if guided:
        assert len(pipe.id2label) == 1000 and pipe.id2label[207] == "golden retriever"
        assert pipe.get_label_ids(["golden retriever", "tench"]) == [207, 0]
    else:
        assert pipe.classifier is None and pipe.id2label == {}


@pytest.mark.parametrize(
    "swap, message",
    [
        (dict(classifier="unet_cond32"), "not a classifier"),
        (dict(checkpoint="classifier32"), "is a classifier itself"),
    ],
)
def test_cli_rejects_wrong_classifier_roles(swap, message, tmp_path, capsys):
    models = FIXTURES / "models"
    roles = dict(dict(checkpoint="unet_cond32", classifier="classifier32"), **swap)
    main, classifier = models / roles["checkpoint"], models / roles["classifier"]
    code = _convert(
        "--checkpoint", main.with_suffix(".safetensors"), "--config", main.with_suffix(".json"),
        "--classifier", classifier.with_suffix(".safetensors"), "--classifier-config", classifier.with_suffix(".json"),
        "--output", tmp_path / "out",
    )  # fmt: skip
    assert code == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "config_text, message",
    [
        ("{not json", "not valid JSON"),
        ('{"image_size": 16}', '"kind"'),
        ('{"kind": "vae", "image_size": 16}', '"kind"'),
        ('{"kind": "unet", "image_size": 16, "num_channels": 32}', "unknown unet arguments: num_channels"),
    ],
)
def test_cli_reports_bad_architecture_config(config_text, message, tmp_path, capsys):
    config = tmp_path / "arch.json"
    config.write_text(config_text)
    checkpoint = FIXTURES / "models" / "unet_uncond16.pt"
    code = _convert("--checkpoint", checkpoint, "--config", config, "--output", tmp_path / "o")
    assert code == 1
    assert message in capsys.readouterr().err


def test_cli_names_the_fix_for_an_unknown_checkpoint(tmp_path, capsys, cached_presets):
    code = _convert("--checkpoint", FIXTURES / "models" / "unet_uncond16.pt", "--output", tmp_path / "o")
    assert code == 1
    err = capsys.readouterr().err
    assert "match no preset" in err and "--preset" in err and "--config" in err


def test_cli_rejects_preset_with_config(tmp_path):
    with pytest.raises(SystemExit):
        _convert("--checkpoint", "x.pt", "--preset", "64x64_classifier.pt", "--config", "a.json", "--output", tmp_path)


# ---------------------------------------------------------------------------------------------------
# Checkpoints that do not fit


def _uncond16():
    kind_and_kwargs = json.loads((FIXTURES / "models" / "unet_uncond16.json").read_text())
    return kind_and_kwargs.pop("kind"), kind_and_kwargs, load_file(FIXTURES / "models" / "unet_uncond16.safetensors")


def test_missing_key_is_named(cached_presets):
    kind, kwargs, state_dict = _uncond16()
    del state_dict["out.2.bias"]
    with pytest.raises(ValueError, match=r"1 missing keys: out\.2\.bias") as info:
        model_from_original(kind, state_dict, **kwargs)
    assert "no released preset matches" in str(info.value)


def test_unexpected_key_is_named(cached_presets):
    kind, kwargs, state_dict = _uncond16()
    state_dict["label_emb.weight"] = torch.zeros(10, 128)
    with pytest.raises(ValueError, match=r"1 unexpected keys: label_emb\.weight"):
        model_from_original(kind, state_dict, **kwargs)


def test_wrong_shape_is_named(cached_presets):
    kind, kwargs, state_dict = _uncond16()
    state_dict["out.2.weight"] = torch.zeros(6, 32, 3, 3)
    with pytest.raises(ValueError, match=r"out\.2\.weight checkpoint \[6, 32, 3, 3\] vs model \[3, 32, 3, 3\]"):
        model_from_original(kind, state_dict, **kwargs)


@pytest.mark.parametrize(
    "actual, requested",
    [
        ("64x64_classifier.pt", "128x128_classifier.pt"),
        ("256x256_diffusion_uncond.pt", "256x256_diffusion.pt"),
        ("64_256_upsampler.pt", "128_512_upsampler.pt"),
    ],
)
def test_mismatch_names_the_preset_that_fits(actual, requested, cached_presets):
    state_dict = _meta_state_dict(RELEASED[actual]["state_dict"])
    with pytest.raises(ValueError) as info:
        load_original_state_dict(preset_model(requested, device="meta"), state_dict, preset=requested)
    message = str(info.value)
    assert f"does not fit preset {requested!r}" in message
    assert f"pass --preset {actual}" in message


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_pt_file(damage, tmp_path):
    data = (FIXTURES / "models" / "unet_uncond16.pt").read_bytes()
    path = tmp_path / "broken.pt"
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": bytes(range(256)) * 64, "empty": b""}[damage])
    with pytest.raises(ValueError, match="corrupt or not an original guided-diffusion checkpoint"):
        load_checkpoint(str(path))


class _Payload:
    """An arbitrary object: loading it would run code from the file."""


def test_pickle_with_objects_is_refused(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"weight": torch.zeros(2), "extra": _Payload()}, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_checkpoint(str(path))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_plain_pickle_is_refused(tmp_path):
    path = tmp_path / "plain.pt"
    path.write_bytes(pickle.dumps({"weight": [0.0, 1.0]}))
    with pytest.raises(ValueError, match="cannot read"):
        load_checkpoint(str(path))


@pytest.mark.parametrize(
    "content",
    [
        {"model": {"weight": torch.zeros(2)}, "step": 10},  # a training checkpoint wrapping the state_dict
        [torch.zeros(2)],
    ],
)
def test_non_state_dict_is_refused(content, tmp_path):
    path = tmp_path / "other.pt"
    torch.save(content, path)
    with pytest.raises(ValueError, match="does not hold a state_dict of tensors"):
        load_checkpoint(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_checkpoint(str(tmp_path / "64x64_diffusion.pt"))


def test_cli_classifier_architecture_needs_classifier(tmp_path, capsys):
    models = FIXTURES / "models"
    code = _convert(
        "--checkpoint", models / "unet_cond32.safetensors", "--config", models / "unet_cond32.json",
        "--classifier-config", models / "classifier32.json", "--output", tmp_path / "out",
    )  # fmt: skip
    assert code == 1
    assert "pass it too" in capsys.readouterr().err
