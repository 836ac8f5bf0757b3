"""FID monitoring of train_diffusion.py (--eval_every): flag errors before training starts, the
reference statistics from a reference batch (stored or from its images), and an evaluation of a
1-channel unconditional model that leaves every global random generator as it was."""

import contextlib
import random
import types

import numpy as np
import pytest
import torch
import train_diffusion
import train_utils as tu
from conftest import CONFIGS, run_script


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from guided_pipelines.inception import make_random_inception_weights

    return make_random_inception_weights(str(tmp_path_factory.mktemp("inception") / "random.pth"), seed=0)


@pytest.fixture
def one_thread():
    """One torch and one BLAS thread, as the scripts run under the tests (OMP_NUM_THREADS=1): on a
    shared CPU the 2048 x 2048 eigendecompositions of FID are many times slower with two threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        limits = contextlib.nullcontext()
    else:
        limits = threadpool_limits(1)
    with limits:
        yield
    torch.set_num_threads(threads)


class FakeAccelerator:
    """The parts of accelerate.Accelerator that FIDMonitor uses, for one CPU process."""

    device = torch.device("cpu")
    num_processes, process_index = 1, 0

    def main_process_first(self):
        return contextlib.nullcontext()

    def reduce(self, tensor, reduction="sum"):
        return tensor


def _args(**overrides):
    base = dict(eval_every=1, eval_num_samples=5, eval_batch_size=3, eval_inception_weights=None, eval_reference=None,
                eval_reference_split=None, eval_respacing="ddim5", eval_fid_method="eigh", seed=0, dataset="unused",
                dataset_split="train", dataloader_num_workers=0)
    base.update(overrides)
    return types.SimpleNamespace(**base)


def _config(channels=3, num_classes=None):
    return types.SimpleNamespace(in_channels=channels, sample_size=16, num_classes=num_classes)


def _scheduler():
    from guided_pipelines.schedulers import ADMScheduler

    return ADMScheduler(num_train_timesteps=100, variance_type="learned_range")


def test_flag_errors_before_training(tmp_path, capsys):
    base = ["--config", CONFIGS / "tiny.yaml", "--dataset", tmp_path, "--output_dir", tmp_path / "o", "--eval_every", 2]

    def error(*extra):
        with pytest.raises(SystemExit):
            train_diffusion.parse_args([str(a) for a in [*base, *extra]])
        return capsys.readouterr().err

    err = error("--eval_inception_weights", tmp_path / "missing.pth")
    assert "--eval_inception_weights" in err and "not found" in err and "weights-inception-2015-12-05" in err
    assert "--eval_num_samples must be ≥ 2" in error("--eval_num_samples", 1)
    assert "--eval_reference" in error("--eval_reference", tmp_path / "missing.npz")
    assert "--eval_every must be ≥ 0" in error("--eval_every", -1)
    args = train_diffusion.parse_args([str(a) for a in base[:-2]])
    assert args.eval_every == 0 and args.eval_num_samples == 2000 and args.eval_respacing == "ddim25"


def test_unreadable_weights_stop_the_run_before_training(tiny_data, tmp_path):
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"not a weights file")
    out = tmp_path / "out"
    proc = run_script("train_diffusion.py", ["--config", CONFIGS / "tiny.yaml", "--dataset", tiny_data,
                                             "--output_dir", out, "--eval_every", 2, "--eval_inception_weights", bad],
                      check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "train_diffusion.py: error: --eval_inception_weights" in proc.stderr
    assert "is not a torch-fidelity Inception-v3 state_dict" in proc.stderr
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


def test_reference_batches(weights, tmp_path, one_thread):
    acc = FakeAccelerator()
    stats = tmp_path / "stats.npz"
    np.savez(stats, mu=np.zeros(2048), sigma=np.eye(2048), mu_s=np.ones(2023), sigma_s=2 * np.eye(2023))
    monitor = tu.FIDMonitor(_args(eval_reference=str(stats), eval_inception_weights=weights), acc, _scheduler(),
                            _config())
    assert monitor.fid._reference[1][0, 0] == 1 and monitor.sfid._reference[0][0] == 1
    assert int(monitor.fid.real_n) == int(monitor.sfid.real_n) == 0  # no image was run

    rng = np.random.default_rng(0)
    images = tmp_path / "images.npz"
    np.savez(images, arr_0=rng.integers(0, 256, (7, 16, 16, 3), dtype=np.uint8))
    monitor = tu.FIDMonitor(_args(eval_reference=str(images), eval_inception_weights=weights), acc, _scheduler(),
                            _config())
    assert monitor.fid._reference is None
    assert int(monitor.fid.real_n) == int(monitor.sfid.real_n) == 7  # all of arr_0, in batches of 3

    empty = tmp_path / "empty.npz"
    np.savez(empty, labels=np.arange(3))
    with pytest.raises(ValueError, match="no arr_0 images and no stored mu/sigma"):
        tu.FIDMonitor(_args(eval_reference=str(empty), eval_inception_weights=weights), acc, _scheduler(), _config())
    with pytest.raises(ValueError, match="--eval_respacing"):
        tu.FIDMonitor(_args(eval_respacing="ddim7x", eval_inception_weights=weights), acc, _scheduler(), _config())
    with pytest.raises(ValueError, match="super-resolution"):
        tu.FIDMonitor(_args(eval_inception_weights=weights), acc, _scheduler(), _config(), superres=True)
    with pytest.raises(ValueError, match="1- or 3-channel"):
        tu.FIDMonitor(_args(eval_inception_weights=weights), acc, _scheduler(), _config(channels=4))


def test_evaluation_of_grayscale_model_keeps_random_streams(weights, tmp_path, one_thread):
    rng = np.random.default_rng(1)
    low = rng.integers(0, 256, (6, 4, 4, 3)).astype(np.float64)
    arr = np.clip(np.repeat(np.repeat(low, 4, axis=1), 4, axis=2) + rng.normal(0, 20, (6, 16, 16, 3)), 0, 255)
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=arr.astype(np.uint8))
    torch.manual_seed(0)
    model = tu.instantiate("unet", dict(sample_size=16, in_channels=1, out_channels=2, model_channels=32,
                                        num_res_blocks=1, attention_resolutions=(), channel_mult=(1, 2),
                                        num_classes=None))
    ema = tu.EMA(model, [0.5, 0.9])
    monitor = tu.FIDMonitor(_args(eval_reference=str(ref), eval_inception_weights=weights), FakeAccelerator(),
                            _scheduler(), model.config)
    before = [p.detach().clone() for p in model.parameters()]
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    states = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    values = monitor.evaluate(model, ema)
    assert values["eval/num_samples"] == 5 and np.isfinite(values["eval/fid"]) and np.isfinite(values["eval/sfid"])
    assert random.getstate() == states[0] and np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert int(monitor.fid.fake_n) == 0 and int(monitor.fid.real_n) == 6  # samples dropped, reference kept
