"""In-process checks of the training machinery: flag/config errors, model resolution, class-count
checks, the process-count–independent data order, EMA, checkpoint rotation, lr anneal, metrics."""

import types

import pytest
import torch
import train_classifier
import train_diffusion
import train_utils as tu
from conftest import CONFIGS

ACC = types.SimpleNamespace(process_index=0, num_processes=1)


def _parse(module, argv):
    return module.parse_args([str(a) for a in argv])


def _error(module, argv, capsys) -> str:
    with pytest.raises(SystemExit):
        _parse(module, argv)
    return capsys.readouterr().err


def test_flag_errors_name_problem_and_fix(tmp_path, capsys):
    base = ["--dataset", tmp_path, "--output_dir", tmp_path / "o"]
    assert "--output_dir is required" in _error(train_diffusion, ["--dataset", tmp_path], capsys)
    assert "--dataset is required" in _error(train_diffusion, ["--output_dir", tmp_path], capsys)
    assert "--lr must be a positive" in _error(train_diffusion, [*base, "--lr", -1], capsys)
    assert "--push_to_hub needs --hub_model_id" in _error(train_diffusion, [*base, "--push_to_hub", "true"], capsys)
    assert "invalid choice: 'fp8'" in _error(train_diffusion, [*base, "--mixed_precision", "fp8"], capsys)
    assert "exceeds --lr_anneal_steps" in _error(
        train_classifier, [*base, "--lr_anneal_steps", 10, "--max_train_steps", 20], capsys
    )
    assert "--max_bad_steps must be ≥ 1" in _error(train_diffusion, [*base, "--max_bad_steps", 0], capsys)
    assert "expected true or false" in _error(train_diffusion, [*base, "--random_flip", "maybe"], capsys)
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("batchsize: 8\n")
    assert "unknown key 'batchsize'" in (err := _error(train_diffusion, [*base, "--config", cfg], capsys))
    assert "did you mean 'batch_size'" in err
    cfg.write_text("mixed_precision: fp32\n")
    assert "'fp32' is not one of" in _error(train_diffusion, [*base, "--config", cfg], capsys)
    assert "does not exist" in _error(train_diffusion, [*base, "--config", tmp_path / "missing.yaml"], capsys)


def test_flags_override_config(tmp_path):
    args = _parse(train_diffusion, ["--config", CONFIGS / "tiny.yaml", "--dataset", tmp_path, "--output_dir", tmp_path,
                                    "--batch_size", 4, "--ema_rates", "0.5,0.25"])
    assert args.batch_size == 4 and args.ema_rates == [0.5, 0.25]
    assert args.beta_schedule == "cosine" and args.max_train_steps == 6  # from the YAML
    assert args.model["num_classes"] == "auto"
    args = _parse(train_diffusion, ["--dataset", tmp_path, "--output_dir", tmp_path, "--lr_anneal_steps", 7])
    assert args.max_train_steps == 7  # defaults to the anneal length, as the original


def test_batch_splitting_errors():
    args = types.SimpleNamespace(batch_size=6, microbatch=-1)
    assert tu.split_batch(args, 2) == (3, 3)
    with pytest.raises(ValueError, match="not divisible by the 4 processes"):
        tu.split_batch(args, 4)
    args.microbatch = 4
    with pytest.raises(ValueError, match="must divide the per-process batch 6"):
        tu.split_batch(args, 1)


def test_imagenet64_config_is_the_released_architecture(tmp_path):
    from guided_pipelines.conversion import preset_model

    args = _parse(train_diffusion, ["--config", CONFIGS / "imagenet64.yaml", "--output_dir", tmp_path])
    assert args.dataset == "ILSVRC/imagenet-1k" and args.batch_size == 2048
    kind, kwargs, info = tu.resolve_model_spec(args, train_diffusion.MODEL_KINDS)
    released = {k: v for k, v in preset_model("64x64_diffusion.pt", device="meta").config.items() if not k.startswith("_")}
    assert kind == "unet" and kwargs == released
    assert kwargs["num_classes"] == 1000 and kwargs["model_channels"] == 192 and kwargs["dropout"] == 0.1
    assert info["beta_schedule"] == "cosine"
    args = _parse(train_classifier, ["--config", CONFIGS / "classifier_imagenet64.yaml", "--output_dir", tmp_path])
    kind, kwargs, _ = tu.resolve_model_spec(args, ("classifier",))
    assert kind == "classifier" and kwargs["num_res_blocks"] == 4 and kwargs["pool"] == "attention"


def test_model_resolution_errors(tmp_path):
    args = _parse(train_diffusion, ["--dataset", tmp_path, "--output_dir", tmp_path, "--preset", "64x64_diffusion"])
    with pytest.raises(ValueError, match="did you mean 64x64_diffusion.pt"):
        tu.resolve_model_spec(args, train_diffusion.MODEL_KINDS)
    args.preset = "64x64_classifier.pt"
    with pytest.raises(ValueError, match="train_classifier.py"):
        tu.resolve_model_spec(args, train_diffusion.MODEL_KINDS)
    args.preset = "64x64_diffusion.pt"
    with pytest.raises(ValueError, match="train_diffusion.py"):
        tu.resolve_model_spec(args, ("classifier",))
    args.preset = None
    with pytest.raises(ValueError, match="no model given"):
        tu.resolve_model_spec(args, train_diffusion.MODEL_KINDS)
    with pytest.raises(ValueError, match="unknown ADMUNet2DModel keywords.*channels_mult"):
        tu.instantiate("unet", {"sample_size": 8, "channels_mult": (1,)})


def test_class_count_mismatch_is_explained(tiny_data, tmp_path):
    args = _parse(train_diffusion, ["--dataset", tiny_data, "--output_dir", tmp_path])
    with pytest.raises(ValueError, match=r"class-count mismatch.*has 3 classes.*built for 1000.*num_classes: 3"):
        tu.resolve_classes("unet", {"sample_size": 16, "num_classes": 1000}, args, ACC)
    kwargs = {"sample_size": 16, "num_classes": "auto"}
    dataset, size, channels = tu.resolve_classes("unet", kwargs, args, ACC)
    assert kwargs["num_classes"] == 3 and (size, channels) == (16, 3) and dataset.class_names == ["cat", "dog", "fox"]
    args.model, args.preset = {"preset": "64x64_classifier.pt", "num_classes": "auto"}, None
    kind, kwargs, _ = tu.resolve_model_spec(args, ("classifier",))
    assert kwargs["num_classes"] == "auto" and kwargs["num_res_blocks"] == 4
    tu.resolve_classes(kind, kwargs, args, ACC)
    assert kwargs["num_classes"] == 3  # a released architecture on a custom dataset
    dataset, _, _ = tu.resolve_classes("unet", {"sample_size": 16, "num_classes": None}, args, ACC)
    assert dataset[0]["label"] == -1  # unconditional model: labels are not needed
    with pytest.raises(ValueError, match="classifier needs num_classes"):
        tu.resolve_classes("classifier", {"sample_size": 16, "num_classes": None}, args, ACC)
    args.dataset = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tu.resolve_classes("unet", {"sample_size": 16}, args, ACC)


def _global_stream(n, batch, world, steps, start=0, seed=0):
    """Per step, every rank's share concatenated in rank order (what accelerator.gather returns)."""
    iters = [iter(tu.StepSampler(n, batch, r, world, seed, start)) for r in range(world)]
    return [[next(it) for it in iters for _ in range(batch // world)] for _ in range(steps)]


def test_step_sampler_is_independent_of_process_count_and_resumable():
    n, batch, steps = 10, 4, 7  # 28 positions: crosses two epoch boundaries
    one = _global_stream(n, batch, 1, steps)
    for world in (2, 4):
        assert _global_stream(n, batch, world, steps) == one
    flat = [x for step in one for x in step]
    for epoch in range(2):
        part = flat[epoch * n : (epoch + 1) * n]
        assert sorted(i for i, _ in part) == list(range(n)) and {e for _, e in part} == {epoch}
    assert [i for i, _ in flat[:n]] != [i for i, _ in flat[n : 2 * n]]  # reshuffled per epoch
    assert _global_stream(n, batch, 2, steps - 3, start=3) == _global_stream(n, batch, 2, steps)[3:]


def test_ema_float32_update_and_state():
    model = torch.nn.Linear(3, 2).to(torch.bfloat16)
    ema = tu.EMA(model, [0.9, 0.5])
    start = [p.detach().float().clone() for p in model.parameters()]
    assert all(s.dtype == torch.float32 for s in ema.shadow[0.9])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for rate in (0.9, 0.5):
        for s, p0, p in zip(ema.shadow[rate], start, model.parameters()):
            torch.testing.assert_close(s, rate * p0 + (1 - rate) * p.float())
    state = ema.state_dict()
    other = tu.EMA(model, [0.9, 0.5])
    other.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(other.shadow[0.5], ema.shadow[0.5]))
    with pytest.raises(ValueError, match="--ema_rates 0.9,0.5"):
        tu.EMA(model, [0.99]).load_state_dict(state)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        tu.EMA(model, [1.0])


def test_checkpoint_listing_and_rotation(tmp_path):
    ckpt = tu.CheckpointManager(str(tmp_path), limit=2)
    root = tmp_path / "checkpoints"
    for name in ("checkpoint-2", "checkpoint-10", "checkpoint-4", "checkpoint-12.tmp", "other"):
        (root / name).mkdir(parents=True)
    assert ckpt.latest().endswith("checkpoint-10")  # numeric order; half-written .tmp ignored
    ckpt.rotate()
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-10", "checkpoint-12.tmp", "checkpoint-4", "other"]
    assert ckpt.resolve(None) is None and ckpt.resolve("latest").endswith("checkpoint-10")
    with pytest.raises(FileNotFoundError, match="'latest' or a checkpoint-STEP folder"):
        ckpt.resolve(str(tmp_path / "nope"))
    assert tu.CheckpointManager(str(tmp_path / "fresh"), None).latest() is None


def test_lr_anneal_quartiles_and_faults(monkeypatch):
    assert tu.lr_at(0, 1e-4, 0) == 1e-4 and tu.lr_at(50, 1e-4, 0, 0.5) == 5e-5
    assert tu.lr_at(25, 2e-4, 100) == pytest.approx(1.5e-4) and tu.lr_at(100, 2e-4, 100) == 0
    t = torch.tensor([0, 249, 250, 999, 998])
    out = tu.quartile_means({"loss": torch.tensor([1.0, 3.0, 5.0, 7.0, 9.0])}, t, 1000, prefix="")
    assert out == {"loss": 5.0, "loss_q0": 2.0, "loss_q1": 5.0, "loss_q3": 8.0}
    monkeypatch.setenv(tu.FAULTS_ENV, "nan@1,3;kill@5")
    faults = tu.Faults()
    assert faults.kill_after == 5 and [faults.nan_now(s) for s in (1, 1, 2, 3)] == [True, False, False, True]
    monkeypatch.setenv(tu.FAULTS_ENV, "explode@1")
    with pytest.raises(ValueError, match="explode@1"):
        tu.Faults()
