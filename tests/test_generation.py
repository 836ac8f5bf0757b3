"""Resumable, process-count-independent sample generation (``evaluation/generate.py``) and the
guidance sweep's bookkeeping, on a tiny random ADM-G pipeline saved to a temporary folder."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from guided_pipelines import generation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GENERATE = os.path.join(ROOT, "evaluation", "generate.py")
TINY = dict(
    sample_size=8,
    in_channels=3,
    model_channels=32,
    num_res_blocks=1,
    attention_resolutions=(2,),
    channel_mult=(1, 2),
    num_head_channels=16,
    use_scale_shift_norm=True,
    resblock_updown=True,
)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _randomize(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    from guided_pipelines import ADMClassifierModel, ADMScheduler, ADMUNet2DModel, ClassifierGuidedPipeline

    unet = _randomize(ADMUNet2DModel(**TINY, out_channels=6, num_classes=4), 1)
    clf = _randomize(ADMClassifierModel(**TINY, num_classes=4, pool="attention"), 2)
    pipe = ClassifierGuidedPipeline(unet=unet, scheduler=ADMScheduler(), classifier=clf)
    path = tmp_path_factory.mktemp("tiny") / "pipe"
    pipe.save_pretrained(path)
    return str(path)


def gen_args(pipeline_dir, out, *extra):
    return [GENERATE, "--pipeline", pipeline_dir, "--out", out, "--num-samples", "9", "--batch-size", "2",
            "--respacing", "6", "--classifier-scale", "3", "--seed", "5", "--no-progress", *extra]


@pytest.fixture(scope="module")
def reference_npz(pipeline_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ref") / "samples.npz")
    proc = subprocess.run([sys.executable, *gen_args(pipeline_dir, out)], env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "on 1 process(es)" in proc.stderr
    return out


def load(path):
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def test_sample_noise_depends_only_on_seed_and_index():
    a = generation.SampleNoise(7, [3, 4, 5], (3, 4, 4), num_classes=10)
    b = generation.SampleNoise(7, [4], (3, 4, 4), num_classes=10)
    assert torch.equal(a.x_T[1], b.x_T[0]) and a.labels[1] == b.labels[0]
    for i in range(3):
        assert torch.equal(a.step_noise(i)[1], b.step_noise(i)[0])
    with pytest.raises(RuntimeError, match="expected step 3"):
        a.step_noise(5)
    c = generation.SampleNoise(8, [4], (3, 4, 4), num_classes=10)
    assert not torch.equal(c.x_T[0], b.x_T[0])
    assert len({generation.sample_seed(0, i) for i in range(1000)}) == 1000


def test_output_is_the_original_format(reference_npz):
    data = load(reference_npz)
    assert sorted(data) == ["arr_0", "arr_1"]
    assert data["arr_0"].shape == (9, 8, 8, 3) and data["arr_0"].dtype == np.uint8
    assert data["arr_1"].shape == (9,) and data["arr_1"].dtype == np.int64 and data["arr_1"].max() < 4
    assert len(np.unique(data["arr_0"].reshape(9, -1), axis=0)) == 9
    assert not os.path.exists(reference_npz + ".parts")  # shards removed after success

    from guided_pipelines.evaluator import open_images

    reader = open_images(reference_npz)  # the evaluator reads it, memory-mapped
    assert reader.memory_mapped
    np.testing.assert_array_equal(np.concatenate(list(reader.batches(4))), data["arr_0"])


def test_matches_the_pipeline_called_directly(reference_npz, pipeline_dir):
    import guided_pipelines.models  # noqa: F401  (registers the model classes for from_pretrained)
    from guided_pipelines.pipelines import ClassifierGuidedPipeline, to_uint8

    pipe = ClassifierGuidedPipeline.from_pretrained(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the generation subprocesses (OMP_NUM_THREADS=1)
    try:
        noise = generation.SampleNoise(5, range(2, 4), (3, 8, 8), 4)
        out = pipe(class_labels=noise.labels, classifier_scale=3.0, respacing="6", latents=noise.x_T,
                   step_noise=noise.step_noise, output_type="latent")
    finally:
        torch.set_num_threads(threads)
    data = load(reference_npz)
    np.testing.assert_array_equal(to_uint8(out.images).numpy(), data["arr_0"][2:4])
    np.testing.assert_array_equal(noise.labels.numpy(), data["arr_1"][2:4])


def test_two_processes_give_the_identical_file(reference_npz, pipeline_dir, tmp_path):
    out = str(tmp_path / "two.npz")
    # Two CPU processes in a gloo process group (accelerate's launcher runs one process with --cpu).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           *gen_args(pipeline_dir, out)]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 process(es)" in proc.stderr
    ref, two = load(reference_npz), load(out)
    assert sorted(ref) == sorted(two)
    for key in ref:
        np.testing.assert_array_equal(ref[key], two[key])


def test_killed_run_resumes_without_missing_or_duplicated_samples(reference_npz, pipeline_dir, tmp_path):
    out = str(tmp_path / "resumed.npz")
    parts = out + ".parts"
    # 1) stop after 2 batches on purpose (--max-batches), 2) SIGKILL a run in the middle, 3) finish.
    proc = subprocess.run([sys.executable, *gen_args(pipeline_dir, out, "--max-batches", "2")], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "2 of 5 batches done" in proc.stderr, proc.stderr
    assert not os.path.exists(out)

    # SIGKILL a run as soon as it has written one more shard, while the other batches are in flight.
    child = subprocess.Popen([sys.executable, *gen_args(pipeline_dir, out)], env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and child.poll() is None:
        if len([f for f in os.listdir(parts) if f.startswith("batch_") and f.endswith(".npz")]) >= 3:
            os.killpg(child.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not os.path.exists(out)
    assert 3 <= len([f for f in os.listdir(parts) if f.endswith(".npz")]) < 5
    # A half-written shard left by a crash is never mistaken for a finished one.
    with open(os.path.join(parts, "batch_000004.npz.999.tmp"), "wb") as f:
        f.write(b"partial")

    proc = subprocess.run([sys.executable, *gen_args(pipeline_dir, out)], env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "resuming" in proc.stderr
    ref, resumed = load(reference_npz), load(out)
    for key in ref:
        np.testing.assert_array_equal(ref[key], resumed[key])


def test_resume_with_other_settings_is_refused(tmp_path):
    parts = str(tmp_path / "x.parts")
    config = {"pipeline": "p", "num_samples": 10, "batch_size": 2, "seed": 0, "classifier_scale": 1.0,
              "respacing": "250", "num_inference_steps": 250, "use_ddim": False, "eta": 0.0, "num_classes": 4,
              "image_shape": [8, 8, 3]}
    generation._check_manifest(parts, config, is_main=True)
    generation._check_manifest(parts, dict(config), is_main=False)  # same settings: fine
    with pytest.raises(ValueError, match=r"seed: 0 -> 1.*same arguments.*delete"):
        generation._check_manifest(parts, {**config, "seed": 1}, is_main=True)


def test_streaming_writer_and_shard_checks(tmp_path):
    rng = np.random.default_rng(0)
    shards = []
    for b, (start, stop) in enumerate(generation.batch_ranges(7, 3)):
        path = generation.shard_path(str(tmp_path), b)
        generation._atomic_savez(path, arr_0=rng.integers(0, 256, (stop - start, 4, 4, 3), dtype=np.uint8),
                                 arr_1=np.arange(start, stop) % 4, indices=np.arange(start, stop))
        assert generation.shard_is_complete(path, start, stop)
        assert not generation.shard_is_complete(path, start, stop + 1)
        shards.append(path)
    out = str(tmp_path / "all.npz")
    generation._write_npz_streaming(out, shards, 7, (4, 4, 3), with_labels=True)
    data = load(out)
    np.testing.assert_array_equal(data["arr_0"], np.concatenate([load(s)["arr_0"] for s in shards]))
    np.testing.assert_array_equal(data["arr_1"], np.arange(7) % 4)
    with pytest.raises(RuntimeError, match="assembled 6 rows"):
        generation._write_npz_streaming(out, shards[:2], 7, (4, 4, 3), with_labels=False)
    broken = generation.shard_path(str(tmp_path), 9)
    with open(broken, "wb") as f:
        f.write(b"PK\x03\x04 truncated")
    assert not generation.shard_is_complete(broken, 0, 1)


def _load_sweep():
    spec = importlib.util.spec_from_file_location("sweep", os.path.join(ROOT, "evaluation", "sweep.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sweep_generates_evaluates_resumes_and_plots(tmp_path, monkeypatch):
    sweep = _load_sweep()
    calls = []

    def fake_generate(ns, log=print):
        calls.append(("generate", ns.classifier_scale, ns.out, ns.num_samples, ns.respacing))
        np.savez(ns.out, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
        return ns.out

    def fake_evaluate(ref, sample, **kwargs):
        calls.append(("evaluate", sample))
        s = float(sample.split("_s")[-1][:-4])
        return {"inception_score": 10 + s, "fid": 20 - s, "sfid": 5.0, "precision": 0.5 + s / 20, "recall": 0.6 - s / 20,
                "num_samples": 4, "num_reference": 4, "fid_infinity": 19 - s, "is_infinity": 10 + s}

    monkeypatch.setattr(sweep.generation, "generate", fake_generate)
    monkeypatch.setattr(sweep.evaluator, "evaluate", fake_evaluate)
    argv = ["--pipeline", "P", "--ref-batch", "R.npz", "--scales", "0,1.5", "--num-samples", "4",
            "--out-dir", str(tmp_path), "--respacing", "ddim25", "--use-ddim", "--no-cache"]
    assert sweep.main(argv) == 0
    assert [c[1] for c in calls if c[0] == "generate"] == [0.0, 1.5]
    assert calls[0][2].endswith("samples_s0.npz") and calls[0][3:] == (4, "ddim25")
    results = json.load(open(tmp_path / "sweep.json"))
    assert results["1.5"]["fid"] == 18.5 and results["1.5"]["classifier_scale"] == 1.5
    png = tmp_path / "sweep.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    calls.clear()
    assert sweep.main(argv[:5] + ["0,1.5,4"] + argv[6:]) == 0  # only the new scale runs
    assert [c[1] for c in calls if c[0] == "generate"] == [4.0]
    assert sweep.main(argv[:5] + ["-1"] + argv[6:]) == 1
