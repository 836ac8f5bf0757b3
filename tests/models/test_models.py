"""The three model classes against the original implementation's outputs, and their diffusers behaviour
(save/load round trip, half precision, channels-last, gradient checkpointing)."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from guided_pipelines.models import ADMClassifierModel, ADMSuperResUNet2DModel, ADMUNet2DModel
from guided_pipelines.models.blocks import GroupNorm32, ResBlock, upsample_nearest_2x

MODEL_FIXTURES = sorted(p.stem for p in (Path(__file__).parents[1] / "fixtures" / "models").glob("*.json"))
CLASSES = (ADMClassifierModel, ADMSuperResUNet2DModel, ADMUNet2DModel)


def _public_config(model) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in model.config.items() if not k.startswith("_")}


def test_fixtures_cover_every_model_class(fixture_model):
    kinds = {type(fixture_model(name)[0]) for name in MODEL_FIXTURES}
    assert kinds == set(CLASSES)


@pytest.mark.parametrize("name", MODEL_FIXTURES)
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])  # in-place and autograd code paths
def test_parity_with_original(name, grad, fixture_model):
    model, inputs, forward = fixture_model(name)
    with torch.set_grad_enabled(grad):
        out = forward(model)
    assert out.requires_grad == grad
    expected = inputs["output"]
    assert out.shape == expected.shape and out.dtype == torch.float32
    error = (out - expected).abs().max().item()
    assert error <= 1e-5 * expected.abs().max().item(), f"{name}: max error {error}"


@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_save_load_round_trip_is_bit_identical(name, fixture_model, tmp_path):
    model, inputs, forward = fixture_model(name)
    model.save_pretrained(tmp_path, safe_serialization=True)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    assert _public_config(reloaded) == _public_config(model)
    original, loaded = model.state_dict(), reloaded.state_dict()
    assert original.keys() == loaded.keys()
    for key in original:
        assert loaded[key].dtype == torch.float32
        assert torch.equal(original[key], loaded[key]), key
    with torch.no_grad():
        assert torch.equal(forward(model), forward(reloaded))


def test_superres_config_keeps_image_channels(fixture_model, tmp_path):
    model = fixture_model("superres32")[0]
    assert model.config.in_channels == 3 and model.config.low_res_size == 8
    assert model.input_blocks[0][0].weight.shape[1] == 6  # x_t and the upsampled low-res image
    model.save_pretrained(tmp_path)
    reloaded = ADMSuperResUNet2DModel.from_pretrained(tmp_path)
    assert reloaded.config.in_channels == 3
    assert reloaded.input_blocks[0][0].weight.shape[1] == 6


@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 5e-3), (torch.bfloat16, 4e-2)])
@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_low_precision_loading(name, dtype, tolerance, fixture_model, tmp_path, monkeypatch):
    model, inputs, forward = fixture_model(name)
    model.save_pretrained(tmp_path)
    low = type(model).from_pretrained(tmp_path, torch_dtype=dtype).eval()
    assert {p.dtype for p in low.parameters()} == {dtype}
    norm_input_dtypes = []
    group_norm = F.group_norm

    def recording_group_norm(x, *args, **kwargs):
        norm_input_dtypes.append(x.dtype)
        return group_norm(x, *args, **kwargs)

    monkeypatch.setattr(F, "group_norm", recording_group_norm)
    with torch.no_grad():
        out = forward(low, dtype=dtype)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert norm_input_dtypes and set(norm_input_dtypes) == {torch.float32}, "GroupNorm must run in float32"
    scale = inputs["output"].abs().max().item()
    error = (out.float() - inputs["output"]).abs().max().item()
    assert error <= tolerance * scale, f"{name} in {dtype}: max error {error} vs output scale {scale}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_group_norm_computes_in_float32(dtype):
    torch.manual_seed(0)
    norm = GroupNorm32(32, 64)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    norm = norm.to(dtype)
    x = (torch.randn(2, 64, 8, 8) * 30 + 100).to(dtype)  # large mean: low-precision statistics are off
    reference = F.group_norm(x.float(), 32, norm.weight.float(), norm.bias.float(), norm.eps).to(dtype)
    if dtype == torch.float16:  # here the input tells the two apart (bfloat16 kernels accumulate in float32)
        assert not torch.equal(F.group_norm(x, 32, norm.weight, norm.bias, norm.eps), reference)
    out = norm(x)
    assert out.dtype == dtype
    assert torch.equal(out, reference)


@pytest.mark.parametrize("name", [n for n in ("unet_cond32", "superres32", "classifier32") if n in MODEL_FIXTURES])
def test_gradient_checkpointing_gives_the_same_gradients(name, fixture_model):
    model, inputs, forward = fixture_model(name)
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    model.train()
    calls = []
    for module in model.modules():
        if isinstance(module, ResBlock):
            module.register_forward_hook(lambda *_: calls.append(1))

    def gradients():
        model.zero_grad(set_to_none=True)
        calls.clear()
        out = forward(model)
        weights = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
        (out * weights).sum().backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}, len(calls)

    plain, plain_calls = gradients()
    model.enable_gradient_checkpointing()
    checkpointed, checkpointed_calls = gradients()
    model.disable_gradient_checkpointing()
    assert checkpointed_calls > plain_calls, "checkpointing did not recompute any block in the backward pass"
    assert plain.keys() == checkpointed.keys() and len(plain) == len(list(model.parameters()))
    for key, grad in plain.items():
        torch.testing.assert_close(checkpointed[key], grad, rtol=1e-5, atol=1e-6 * grad.abs().max().item(), msg=key)


@pytest.mark.parametrize("channels_last", [False, True])
def test_nearest_upsampling_matches_interpolate(channels_last):
    x = torch.randn(2, 5, 3, 4)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out = upsample_nearest_2x(x)
    assert torch.equal(out, F.interpolate(x, scale_factor=2, mode="nearest"))
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_channels_last_model(name, fixture_model):
    model, inputs, forward = fixture_model(name)
    with torch.no_grad():
        expected = forward(model)
        out = forward(model.to(memory_format=torch.channels_last), memory_format=torch.channels_last)
    assert model.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    error = (out - expected).abs().max().item()
    assert error <= 1e-5 * expected.abs().max().item(), f"{name}: channels-last max error {error}"
