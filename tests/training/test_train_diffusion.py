"""training/train_diffusion.py end to end on a tiny ADM: two processes equal one, a killed and resumed
run equals an uninterrupted one bit for bit, non-finite steps are skipped and trigger a restore."""

import json
import math
import signal

import pytest
import torch
from conftest import CONFIGS, load_weights, read_metrics, run_script, train_rows

STEPS = 5
COMMON = [
    "--config", CONFIGS / "tiny.yaml",
    "--max_train_steps", STEPS,
    "--checkpointing_steps", 2,
    "--batch_size", 8,
    "--microbatch", 2,
    "--ema_rates", "0.9999,0.9",
    "--report_to", "none",
    # Conv biases right before a one-channel-per-group GroupNorm get gradients that are pure rounding
    # noise (~1e-9); Adam with eps=1e-8 turns noise into ±lr steps, which differ with the summation
    # order of 1 vs 2 processes. eps=1e-5 keeps such noise out of the weights, real gradients unchanged.
    "--adam_epsilon", 1e-5,
]
FOLDERS = ("model/unet", "ema_0.9999/unet", "ema_0.9/unet")


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    """One uninterrupted single-process run (one DataLoader worker)."""
    out = tmp_path_factory.mktemp("diffusion_ref")
    run_script("train_diffusion.py", [*COMMON, "--dataset", tiny_data, "--output_dir", out,
                                      "--dataloader_num_workers", 1, "--checkpoints_total_limit", 2])
    return out


def test_reference_run_outputs(reference):
    rows = train_rows(reference)
    assert [r[0] for r in rows] == list(range(1, STEPS + 1))
    assert all(torch.isfinite(torch.tensor(r[1:])).all() for r in rows)
    last = read_metrics(reference)[-1]
    assert last["skipped_images"] >= 1  # the corrupt PNG was passed over, not fatal
    assert any(k.startswith("vb_q") for k in last) and last["vb"] > 0  # learned variance: L_hybrid
    # rotation: --checkpoints_total_limit 2 keeps the newest two; no temporary folders remain
    assert sorted(p.name for p in (reference / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-5"]
    # pipeline folders: EMA weights differ from the raw weights, and the faster EMA moved further
    raw, slow, fast = (load_weights(reference / f) for f in FOLDERS)

    def gap(a):
        return sum(float((raw[k] - a[k]).pow(2).sum()) for k in raw)

    assert 0 < gap(fast) < gap(slow)
    assert all(v.dtype == torch.float32 for v in slow.values())
    index = json.loads((reference / "ema_0.9999" / "model_index.json").read_text())
    assert index["_class_name"] == "ClassifierGuidedPipeline"
    assert {int(k): v for k, v in index["id2label"].items()} == {0: "cat", 1: "dog", 2: "fox"}
    sched = json.loads((reference / "ema_0.9999" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["beta_schedule"] == "cosine" and sched["variance_type"] == "learned_range"
    # the folder is a pipeline: ClassifierGuidedPipeline.from_pretrained loads the EMA weights
    import guided_pipelines.models.unet_adm  # noqa: F401  (diffusers resolves components by module)
    import guided_pipelines.schedulers.scheduling_adm  # noqa: F401
    from guided_pipelines import ClassifierGuidedPipeline

    pipe = ClassifierGuidedPipeline.from_pretrained(reference / "ema_0.9999")
    assert pipe.id2label == {0: "cat", 1: "dog", 2: "fox"} and pipe.classifier is None
    loaded = pipe.unet.state_dict()
    assert all(torch.equal(loaded[k], slow[k]) for k in slow)


def test_two_processes_match_one(reference, tiny_data, tmp_path):
    run_script("train_diffusion.py", [*COMMON, "--dataset", tiny_data, "--output_dir", tmp_path,
                                      "--dataloader_num_workers", 0], processes=2)
    state = torch.load(tmp_path / "checkpoints" / f"checkpoint-{STEPS}" / "custom_checkpoint_0.pkl", weights_only=False)
    assert state["world_size"] == 2
    one, two = train_rows(reference), train_rows(tmp_path)
    assert [r[0] for r in two] == [r[0] for r in one]
    for a, b in zip(one, two):
        assert torch.allclose(torch.tensor(a[1:]), torch.tensor(b[1:]), rtol=1e-5, atol=1e-7), (a, b)
    for folder in FOLDERS:
        wa, wb = load_weights(reference / folder), load_weights(tmp_path / folder)
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6, msg=f"{folder}:{k}")


def test_killed_run_resumes_exactly(reference, tiny_data, tmp_path):
    args = [*COMMON, "--dataset", tiny_data, "--output_dir", tmp_path, "--dataloader_num_workers", 0]
    killed = run_script("train_diffusion.py", args, env={"GUIDED_PIPELINES_TEST_FAULTS": "kill@3"}, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-2"]
    assert [r[0] for r in train_rows(tmp_path)] == [1, 2, 3]  # step 3 ran, but was never checkpointed
    assert not (tmp_path / "model").exists()
    run_script("train_diffusion.py", [*args, "--resume_from_checkpoint", "latest"])
    assert train_rows(tmp_path) == train_rows(reference)  # losses, grad norms, lrs: identical floats
    for folder in FOLDERS:
        wa, wb = load_weights(reference / folder), load_weights(tmp_path / folder)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), folder


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A randomly initialised Inception-v3 saved like torch-fidelity's weights file (no download)."""
    from guided_pipelines.inception import make_random_inception_weights

    return make_random_inception_weights(str(tmp_path_factory.mktemp("inception") / "random.pth"), seed=0)


def test_fid_monitoring_logs_fid_and_leaves_training_unchanged(reference, tiny_data, tmp_path, inception_weights):
    """--eval_every 2: eval/fid and eval/sfid at steps 2, 4 and the last (5), equal to an independent
    computation, and the same losses and weights, bit for bit, as the run without evaluation."""
    run_script("train_diffusion.py", [*COMMON, "--dataset", tiny_data, "--output_dir", tmp_path,
                                      "--dataloader_num_workers", 1, "--checkpoints_total_limit", 2,
                                      "--eval_every", 2, "--eval_num_samples", 8, "--eval_batch_size", 5,
                                      "--eval_inception_weights", inception_weights])
    evals = [m for m in read_metrics(tmp_path) if "eval/fid" in m]
    assert [m["step"] for m in evals] == [2, 4, 5]
    for m in evals:
        assert m["eval/num_samples"] == 8
        assert math.isfinite(m["eval/fid"]) and m["eval/fid"] > 0
        assert math.isfinite(m["eval/sfid"]) and m["eval/sfid"] > 0
    assert train_rows(tmp_path) == train_rows(reference)
    for folder in FOLDERS:
        wa, wb = load_weights(reference / folder), load_weights(tmp_path / folder)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), folder

    # Independent recomputation of the last evaluation: samples i = 0..7 of the saved first EMA weights
    # with noise from (mix_seed(seed, 7), i), DDIM 25 steps; reference: 8 training images picked by a
    # permutation seeded with mix_seed(seed, 9), center-cropped, unflipped.
    import train_utils as tu

    from guided_pipelines import ClassifierGuidedPipeline
    from guided_pipelines.data import load_image_dataset
    from guided_pipelines.generation import SampleNoise
    from guided_pipelines.inception import ADMInception
    from guided_pipelines.metrics import fid_from_features
    from guided_pipelines.pipelines import to_uint8

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # several threads on a shared CPU are much slower here
    try:
        pipe = ClassifierGuidedPipeline.from_pretrained(tmp_path / "ema_0.9999")
        pipe.set_progress_bar_config(disable=True)
        noise = SampleNoise(tu.mix_seed(0, 7), range(8), (3, 16, 16), 3)
        out = pipe(class_labels=noise.labels, classifier_scale=0, respacing="ddim25", use_ddim=True,
                   latents=noise.x_T, step_noise=noise.step_noise, output_type="latent")
        samples = to_uint8(out.images)  # NHWC uint8, the original export
        data = load_image_dataset(str(tiny_data), image_size=16, class_cond=False, random_crop=False,
                                  random_flip=False)
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(tu.mix_seed(0, 9)))[:8]
        real = torch.stack([data[(int(i), 0)]["image"] for i in order])
        real = ((real + 1) * 127.5).round().to(torch.uint8)
        net = ADMInception(inception_weights)
        fake_pool, fake_spatial, _ = net(samples)
        real_pool, real_spatial, _ = net(real)
    finally:
        torch.set_num_threads(threads)
    assert evals[-1]["eval/fid"] == pytest.approx(fid_from_features(fake_pool, real_pool, method="eigh"), rel=1e-6)
    assert evals[-1]["eval/sfid"] == pytest.approx(fid_from_features(fake_spatial, real_spatial, method="eigh"),
                                                   rel=1e-6)


def test_non_finite_steps_are_skipped_then_restored(tiny_data, tmp_path):
    # steps 2 and 3 (0-based) get a NaN loss; K=2 consecutive bad steps restore checkpoint-2 at half lr
    run_script("train_diffusion.py", [
        *COMMON, "--dataset", tiny_data, "--output_dir", tmp_path, "--dataloader_num_workers", 0,
        "--max_train_steps", 4, "--max_bad_steps", 2, "--bad_step_lr_factor", 0.5,
    ], env={"GUIDED_PIPELINES_TEST_FAULTS": "nan@2,3"})
    events = read_metrics(tmp_path)
    restore = [e for e in events if e.get("event") == "restore"]
    assert len(restore) == 1 and restore[0]["step"] == 2 and restore[0]["lr_scale"] == 0.5
    rows = [e for e in events if "loss" in e]
    assert [e["step"] for e in rows] == [1, 2, 3, 4]  # the bad steps 3, 4 were dropped and replayed
    assert [e["lr"] for e in rows] == [1e-4, 1e-4, 5e-5, 5e-5]
    assert all(e["step_applied"] for e in rows)
    state = torch.load(tmp_path / "checkpoints" / "checkpoint-4" / "custom_checkpoint_0.pkl", weights_only=False)
    assert state["restores"] == 1 and state["bad_steps"] == 2 and state["lr_scale"] == 0.5
    weights = load_weights(tmp_path / "ema_0.9999" / "unet")
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_superres_bf16_checkpointing_streaming(tiny_data, tmp_path):
    """ADM-U, bf16 autocast, gradient checkpointing, the second-moment sampler, a streamed dataset,
    tensorboard and rotation to one checkpoint."""
    cfg = tmp_path / "sr.yaml"
    cfg.write_text(
        "model:\n  kind: superres\n  sample_size: 16\n  low_res_size: 8\n  model_channels: 32\n  out_channels: 6\n"
        "  num_res_blocks: 1\n  attention_resolutions: [2]\n  channel_mult: [1, 2]\n  num_head_channels: 16\n"
        "  num_classes: auto\n"
        "batch_size: 4\nmicrobatch: 2\nmax_train_steps: 3\ncheckpointing_steps: 1\ncheckpoints_total_limit: 1\n"
        "mixed_precision: bf16\ngradient_checkpointing: true\nschedule_sampler: loss-second-moment\n"
        "streaming: true\nshuffle_buffer_size: 8\ndataloader_num_workers: 0\nema_rates: 0.999\n"
        "report_to: tensorboard\n"
    )
    out = tmp_path / "out"
    run_script("train_diffusion.py", ["--config", cfg, "--dataset", tiny_data, "--output_dir", out])
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-3"]
    assert list((out / "logs").rglob("events.out.tfevents*"))
    sampler = torch.load(out / "checkpoints" / "checkpoint-3" / "custom_checkpoint_2.pkl", weights_only=False)
    assert int(sampler["loss_counts"].sum()) == 3 * 4  # every sample's loss was recorded
    from guided_pipelines import ADMSuperResUNet2DModel

    model = ADMSuperResUNet2DModel.from_pretrained(out / "ema_0.999" / "unet")
    assert model.config.low_res_size == 8 and model.config.num_classes == 3
    assert not model.gradient_checkpointing
    rows = train_rows(out)
    assert len(rows) == 3 and all(torch.isfinite(torch.tensor(r[1:4])).all() for r in rows)
    assert json.loads((out / "ema_0.999" / "model_index.json").read_text())["_class_name"] == "ADMUpsamplePipeline"
