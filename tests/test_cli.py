import subprocess
import sys

import PIL.Image
import pytest
import torch

from guided_pipelines import ADMClassifierModel, ADMScheduler, ADMUNet2DModel, ClassifierGuidedPipeline
from guided_pipelines.cli import main


def _tiny_pipeline(path):
    torch.manual_seed(0)
    kw = dict(sample_size=8, in_channels=1, model_channels=32, num_res_blocks=1, attention_resolutions=(2,),
              channel_mult=(1, 2), num_head_channels=16)
    pipe = ClassifierGuidedPipeline(
        unet=ADMUNet2DModel(**kw, out_channels=2, num_classes=3),
        scheduler=ADMScheduler(),
        classifier=ADMClassifierModel(**kw, num_classes=3),
        id2label={0: "Sneaker", 1: "Bag", 2: "Ankle boot"},
        recommended_classifier_scale=2.0,
    )
    pipe.save_pretrained(path)


def test_sample_writes_labelled_grid(tmp_path, capsys):
    _tiny_pipeline(tmp_path / "pipe")
    out = tmp_path / "grid.png"
    rc = main(["sample", "--pipeline", str(tmp_path / "pipe"), "--labels", "bag", "0", "Ankle Boot",
               "--steps", "2", "--out", str(out)])
    assert rc == 0
    assert "3 samples, classifier scale 2.0" in capsys.readouterr().out
    grid = PIL.Image.open(out)
    assert grid.width > 3 * 8 and grid.mode == "RGB"


def test_sample_is_deterministic_for_a_seed(tmp_path):
    _tiny_pipeline(tmp_path / "pipe")
    for name in ("a.png", "b.png"):
        assert main(["sample", "--pipeline", str(tmp_path / "pipe"), "--steps", "2", "--use-ddim",
                     "--respacing", "ddim2", "--seed", "3", "--out", str(tmp_path / name)]) == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_sample_with_dpm_solver(tmp_path):
    _tiny_pipeline(tmp_path / "pipe")
    assert main(["sample", "--pipeline", str(tmp_path / "pipe"), "--scheduler", "dpm++", "--steps", "3",
                 "--labels", "Sneaker", "--out", str(tmp_path / "g.png")]) == 0


def test_sample_unknown_label_is_a_clear_error(tmp_path, capsys):
    _tiny_pipeline(tmp_path / "pipe")
    rc = main(["sample", "--pipeline", str(tmp_path / "pipe"), "--labels", "sneakr", "--out", str(tmp_path / "g.png")])
    assert rc == 1
    err = capsys.readouterr().err
    assert "unknown class name 'sneakr'" in err and "sneaker" in err
    assert not (tmp_path / "g.png").exists()


def test_unknown_verb_and_bad_flag():
    assert main(["smaple"]) == 2
    proc = subprocess.run([sys.executable, "-m", "guided_pipelines.cli", "sample", "--classifier-scale", "x"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid float value" in proc.stderr


def test_help_lists_verbs(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for verb in ("sample", "convert", "evaluate", "generate"):
        assert verb in out
