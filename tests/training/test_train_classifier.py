"""training/train_classifier.py end to end on a tiny noisy classifier: validation metrics, two
processes equal one, exact resume after a kill, and the saved ADMClassifierModel folder."""

import json
import signal

import pytest
import torch
from conftest import CONFIGS, load_weights, read_metrics, run_script, train_rows

STEPS = 4
KEYS = ("loss", "acc@1", "acc@5", "grad_norm", "lr")
COMMON = [
    "--config", CONFIGS / "classifier_tiny.yaml",
    "--max_train_steps", STEPS,
    "--lr_anneal_steps", 8,
    "--checkpointing_steps", 2,
    "--eval_every", 2,
    "--batch_size", 6,
    "--microbatch", 3,
    "--noised_max_timestep", 500,
    "--report_to", "none",
    "--adam_epsilon", 1e-5,  # see test_train_diffusion.py: keeps Adam from amplifying rounding noise
]


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("classifier_ref")
    run_script("train_classifier.py", [*COMMON, "--dataset", tiny_data, "--output_dir", out])
    return out


def _val(out):
    return [m for m in read_metrics(out) if "val_loss" in m]


def test_reference_outputs(reference):
    rows = train_rows(reference, KEYS)
    assert [r[0] for r in rows] == [1, 2, 3, 4]
    assert [r[5] for r in rows] == pytest.approx([3e-4 * (1 - s / 8) for s in range(4)])  # linear anneal
    vals = _val(reference)
    assert [v["step"] for v in vals] == [2, 4]
    for v in vals:
        assert v["val_count"] == 9 and 0 <= v["val_acc@1"] <= v["val_acc@5"] <= 1
        # t < 500 of 1000: only the first two timestep quartiles occur
        assert any(k.startswith("val_loss_q") for k in v)
        assert not any(k in v for k in ("val_loss_q2", "val_loss_q3"))
    assert all(not any(k in m for k in ("loss_q2", "loss_q3")) for m in read_metrics(reference))
    from guided_pipelines import ADMClassifierModel

    model = ADMClassifierModel.from_pretrained(reference / "classifier")
    assert model.config.num_classes == 3 and model.config.sample_size == 16
    logits = model(torch.zeros(2, 3, 16, 16), torch.tensor([0, 499]))
    assert logits.shape == (2, 3)
    schedule = json.loads((reference / "classifier" / "noise_schedule.json").read_text())
    assert schedule == {"num_train_timesteps": 1000, "beta_schedule": "linear", "noised": True,
                        "noised_max_timestep": 500}


def test_two_processes_match_one(reference, tiny_data, tmp_path):
    run_script("train_classifier.py", [*COMMON, "--dataset", tiny_data, "--output_dir", tmp_path], processes=2)
    one, two = train_rows(reference, KEYS), train_rows(tmp_path, KEYS)
    assert len(one) == len(two)
    for a, b in zip(one, two):
        assert torch.allclose(torch.tensor(a[1:]), torch.tensor(b[1:]), rtol=1e-5, atol=1e-6), (a, b)
    for va, vb in zip(_val(reference), _val(tmp_path)):
        assert va["val_count"] == vb["val_count"] == 9
        assert va["val_loss"] == pytest.approx(vb["val_loss"], rel=1e-5)
        assert va["val_acc@1"] == vb["val_acc@1"]
    wa, wb = load_weights(reference / "classifier"), load_weights(tmp_path / "classifier")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6, msg=k)


def test_killed_run_resumes_exactly(reference, tiny_data, tmp_path):
    args = [*COMMON, "--dataset", tiny_data, "--output_dir", tmp_path]
    killed = run_script("train_classifier.py", args, env={"GUIDED_PIPELINES_TEST_FAULTS": "kill@3"}, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["checkpoint-2"]
    run_script("train_classifier.py", [*args, "--resume_from_checkpoint", "latest"])
    assert train_rows(tmp_path, KEYS) == train_rows(reference, KEYS)
    assert _val(tmp_path) == _val(reference)
    wa, wb = load_weights(reference / "classifier"), load_weights(tmp_path / "classifier")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
