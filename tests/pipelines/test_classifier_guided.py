import json
import os

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler
from safetensors.torch import load_file

from guided_pipelines import ADMClassifierModel, ADMScheduler, ADMUpsamplePipeline, ClassifierGuidedPipeline
from guided_pipelines.pipelines import to_uint8

SAMPLING_RUNS = ["ddim_eta_unguided", "ddim_guided_cosine", "ddpm_fixed_variance", "ddpm_guided", "superres"]


def _available_runs(fixtures_dir):
    runs = sorted(p.stem for p in (fixtures_dir / "sampling").glob("*.json"))
    assert set(SAMPLING_RUNS) <= set(runs)
    return runs


@pytest.mark.parametrize("run_name", SAMPLING_RUNS)
def test_trajectories_match_original(fixtures_dir, fixture_model, run_name):
    """Every reference trajectory, reproduced through the public pipeline API."""
    run = json.loads((fixtures_dir / "sampling" / f"{run_name}.json").read_text())
    ref = load_file(fixtures_dir / "sampling" / f"{run_name}.safetensors")
    unet = fixture_model(run["unet"])[0]
    classifier = fixture_model(run["classifier"])[0] if run["classifier"] else None
    learned = unet.config.out_channels == 2 * unet.config.in_channels
    scheduler = ADMScheduler(
        num_train_timesteps=run["steps"],
        beta_schedule=run["schedule"],
        variance_type="learned_range" if learned else "fixed_large",
        clip_sample=run["clip"],
    )
    seen, pred_x0 = [], []

    def record(pipe, i, t, tensors):
        seen.append(tensors["latents"].clone())
        pred_x0.append(tensors["pred_original_sample"].clone())
        return {}

    common = dict(
        respacing=run["respacing"],
        use_ddim=run["use_ddim"],
        eta=run["eta"],
        latents=ref["init_noise"],
        step_noise=ref["step_noise"],
        output_type="latent",
        callback_on_step_end=record,
        callback_on_step_end_tensor_inputs=["latents", "pred_original_sample"],
    )
    if "low_res" in ref:
        pipe = ADMUpsamplePipeline(unet=unet, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        out = pipe(ref["low_res"], class_labels=ref["labels"] if "labels" in ref else None, **common)
    else:
        pipe = ClassifierGuidedPipeline(unet=unet, scheduler=scheduler, classifier=classifier)
        pipe.set_progress_bar_config(disable=True)
        labels = ref["labels"].tolist() if "labels" in ref else None
        out = pipe(class_labels=labels, classifier_scale=run["scale"], **common)
    assert pipe.scheduler.timesteps.tolist() == ref["timesteps"].tolist()
    assert len(seen) == ref["samples"].shape[0]
    for i, (ours, theirs) in enumerate(zip(seen, ref["samples"])):
        assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max(), f"step {i}"
    for i, (ours, theirs) in enumerate(zip(pred_x0, ref["pred_x0"])):
        assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max(), f"pred_x0 step {i}"
    assert torch.equal(out.images, seen[-1])


def test_all_fixture_runs_are_covered(fixtures_dir):
    assert _available_runs(fixtures_dir) == sorted(SAMPLING_RUNS)


def test_output_types(tiny_pipeline):
    pipe = tiny_pipeline()
    kw = dict(class_labels=[0, 3], num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    latent = pipe(output_type="latent", **kw).images
    kw["generator"] = torch.Generator().manual_seed(0)
    pt = pipe(output_type="pt", **kw).images
    kw["generator"] = torch.Generator().manual_seed(0)
    out = pipe(output_type="np", **kw)
    kw["generator"] = torch.Generator().manual_seed(0)
    pil = pipe(**kw).images
    assert latent.shape == (2, 3, 8, 8)
    torch.testing.assert_close(pt, (latent / 2 + 0.5).clamp(0, 1))
    assert out.images.shape == (2, 8, 8, 3) and out.images.min() >= 0 and out.images.max() <= 1
    assert out.class_labels.tolist() == [0, 3]
    assert isinstance(pil[0], PIL.Image.Image) and pil[0].size == (8, 8)
    images, labels = pipe(output_type="np", return_dict=False, **kw)
    assert labels.tolist() == [0, 3]


def test_label_names_and_synonyms(tiny_pipeline):
    pipe = tiny_pipeline()
    assert pipe.get_label_ids(["Golden Retriever", "tinca tinca", "goldfish", 3, "1"]) == [2, 0, 1, 3, 1]
    with pytest.raises(ValueError, match="close matches: golden retriever"):
        pipe.get_label_ids(["golden retreiver"])


def test_ambiguous_imagenet_names_are_rejected(tiny_pipeline):
    from guided_pipelines.conversion import imagenet_labels

    pipe = tiny_pipeline(num_classes=1000)
    pipe.register_to_config(id2label=imagenet_labels())
    assert pipe.get_label_ids(["golden retriever", "giant panda", "toilet tissue"]) == [207, 388, 999]
    with pytest.raises(ValueError, match="ambiguous.*387.*388|ambiguous.*388.*387"):
        pipe.get_label_ids(["panda"])
    with pytest.raises(ValueError, match=r"'Crane' is ambiguous \(134: crane; 517: crane\)"):
        pipe.get_label_ids(["Crane"])


def test_random_labels_for_conditional_model_are_seeded(tiny_pipeline):
    pipe = tiny_pipeline()
    a = pipe(num_images=5, num_inference_steps=2, generator=torch.Generator().manual_seed(3), output_type="latent")
    b = pipe(num_images=5, num_inference_steps=2, generator=torch.Generator().manual_seed(3), output_type="latent")
    assert a.class_labels.shape == (5,) and 0 <= a.class_labels.min() and a.class_labels.max() < 4
    assert torch.equal(a.class_labels, b.class_labels) and torch.equal(a.images, b.images)


def test_unconditional_unet_guided_by_classifier(tiny_pipeline):
    pipe = tiny_pipeline(conditional=False)
    gen = torch.Generator().manual_seed(0)
    plain = pipe(class_labels=[1, 2], classifier_scale=0, num_inference_steps=3, generator=gen, output_type="latent")
    gen = torch.Generator().manual_seed(0)
    guided = pipe(class_labels=[1, 2], classifier_scale=10, num_inference_steps=3, generator=gen, output_type="latent")
    assert guided.class_labels.tolist() == [1, 2]
    assert not torch.allclose(plain.images, guided.images)


def test_guidance_raises_classifier_log_probability(tiny_pipeline):
    """With a large scale, the classifier assigns more probability to the requested class."""
    pipe = tiny_pipeline()
    labels = [0, 1, 2, 3] * 2
    scores = []
    for scale in (0.0, 30.0):
        x = pipe(class_labels=labels, classifier_scale=scale, respacing="ddim5", use_ddim=True,
                 generator=torch.Generator().manual_seed(0), output_type="latent").images
        with torch.no_grad():
            logp = torch.log_softmax(pipe.classifier(x, torch.zeros(len(labels), dtype=torch.long)), -1)
        scores.append(logp[torch.arange(len(labels)), torch.tensor(labels)].mean().item())
    assert scores[1] > scores[0]


def test_classifier_parameters_keep_requires_grad(tiny_pipeline):
    pipe = tiny_pipeline()
    pipe(class_labels=[0], num_inference_steps=2, output_type="latent")
    assert all(p.requires_grad for p in pipe.classifier.parameters())


def test_generator_list_gives_per_image_streams(tiny_pipeline):
    pipe = tiny_pipeline()
    both = pipe(class_labels=[0, 1], num_inference_steps=3, output_type="latent",
                generator=[torch.Generator().manual_seed(10), torch.Generator().manual_seed(11)]).images
    second = pipe(class_labels=[1], num_inference_steps=3, output_type="latent",
                  generator=[torch.Generator().manual_seed(11)]).images
    torch.testing.assert_close(both[1:], second, atol=1e-5, rtol=1e-5)


def test_step_noise_callable_equals_tensor(tiny_pipeline):
    pipe = tiny_pipeline()
    latents = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(4, 2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    a = pipe(class_labels=[0, 1], respacing="4", latents=latents, step_noise=noise, output_type="latent").images
    b = pipe(class_labels=[0, 1], respacing="4", latents=latents, step_noise=lambda i, t: noise[i], output_type="latent").images
    assert torch.equal(a, b)


def test_callback_can_replace_latents(tiny_pipeline):
    pipe = tiny_pipeline()

    def zero_at_last(p, i, t, tensors):
        return {"latents": torch.zeros_like(tensors["latents"])} if i == 2 else {}

    out = pipe(class_labels=[0], num_inference_steps=3, callback_on_step_end=zero_at_last, output_type="latent")
    assert torch.equal(out.images, torch.zeros(1, 3, 8, 8))


def _count_forward_calls(pipe):
    calls = []
    for model in (pipe.unet, pipe.classifier):
        if model is not None:
            model.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(class_labels=[7]), "out of range"),
        (dict(class_labels=[-1]), "out of range"),
        (dict(class_labels=["golden retreiver"]), "unknown class name"),
        (dict(class_labels=[0], respacing="ddim999"), "integer stride"),
        (dict(class_labels=[0], num_inference_steps=1001), "exceeds the 1000 steps"),
        (dict(class_labels=[0], output_type="jpeg"), "output_type"),
        (dict(class_labels=[0, 1], num_images=3), "one per image"),
        (dict(class_labels=[0], latents=torch.zeros(1, 3, 16, 16)), "latents must have shape"),
        (dict(class_labels=[0, 1], generator=[torch.Generator()]), "one per image"),
        (dict(class_labels=[0], classifier_scale=-1), "classifier_scale"),
        (dict(class_labels=[0], step_noise=torch.zeros(2, 1, 3, 8, 8), num_inference_steps=3), "step_noise"),
    ],
)
def test_bad_input_raises_before_any_model_runs(tiny_pipeline, kwargs, message):
    pipe = tiny_pipeline()
    calls = _count_forward_calls(pipe)
    with pytest.raises(ValueError, match=message):
        pipe(**kwargs)
    assert not calls


def test_scale_without_classifier_rejected(tiny_pipeline):
    pipe = tiny_pipeline(classifier=False)
    calls = _count_forward_calls(pipe)
    with pytest.raises(ValueError, match="needs a classifier"):
        pipe(class_labels=[0], classifier_scale=1.0)
    assert not calls
    assert pipe(class_labels=[0], classifier_scale=0, num_inference_steps=2, output_type="latent").images.shape[0] == 1


def test_mismatched_classifier_rejected(tiny_pipeline):
    pipe = tiny_pipeline()
    big = ADMClassifierModel(sample_size=16, model_channels=32, num_classes=4, num_res_blocks=1,
                             attention_resolutions=(2,), channel_mult=(1, 2), num_head_channels=16)
    with pytest.raises(ValueError, match="same resolution"):
        ClassifierGuidedPipeline(unet=pipe.unet, scheduler=pipe.scheduler, classifier=big)
    other = ADMClassifierModel(sample_size=8, model_channels=32, num_classes=5, num_res_blocks=1,
                               attention_resolutions=(2,), channel_mult=(1, 2), num_head_channels=16)
    with pytest.raises(ValueError, match="same labels"):
        ClassifierGuidedPipeline(unet=pipe.unet, scheduler=pipe.scheduler, classifier=other)


def test_save_and_reload_samples_identically(tiny_pipeline, tmp_path):
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    assert (tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert (tmp_path / "pipe" / "classifier" / "diffusion_pytorch_model.safetensors").exists()
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["unet"] == ["guided_pipelines.models.unet_adm", "ADMUNet2DModel"]
    loaded = ClassifierGuidedPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.id2label == pipe.id2label
    kw = dict(class_labels=["golden retriever", 3], num_inference_steps=4, output_type="latent")
    a = pipe(generator=torch.Generator().manual_seed(5), **kw).images
    b = loaded(generator=torch.Generator().manual_seed(5), **kw).images
    assert torch.equal(a, b)


def test_load_from_repo_id_via_local_snapshot(tiny_pipeline, tmp_path, monkeypatch):
    """A Hub repo id resolves through huggingface_hub's cache (offline: a pre-populated snapshot)."""
    pipe = tiny_pipeline(classifier=False)
    repo = tmp_path / "cache" / "models--someone--tiny-adm"
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    pipe.save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123456789abcdef0123456789abcdef01234567")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = ClassifierGuidedPipeline.from_pretrained("someone/tiny-adm", cache_dir=str(tmp_path / "cache"))
    loaded.set_progress_bar_config(disable=True)
    kw = dict(class_labels=[1], classifier_scale=0, num_inference_steps=3, output_type="latent")
    a = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    b = loaded(generator=torch.Generator().manual_seed(1), **kw).images
    assert torch.equal(a, b)


@pytest.mark.parametrize("scheduler_cls", [DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler])
def test_guidance_with_stock_diffusers_schedulers(tiny_pipeline, scheduler_cls):
    pipe = tiny_pipeline()
    pipe.scheduler = scheduler_cls(num_train_timesteps=1000, beta_schedule="linear")
    outs = []
    for scale in (0.0, 5.0, 5.0):
        outs.append(pipe(class_labels=[0, 2], classifier_scale=scale, num_inference_steps=5,
                         generator=torch.Generator().manual_seed(0), output_type="latent").images)
    assert torch.isfinite(outs[0]).all()
    assert not torch.allclose(outs[0], outs[1])
    assert torch.equal(outs[1], outs[2])


def test_to_uint8_matches_original_export():
    x = torch.tensor([-1.5, -1.0, -0.5, 0.0, 0.999, 1.0, 2.0]).view(1, 1, 1, 7).expand(1, 3, 1, 7)
    out = to_uint8(x)
    assert out.shape == (1, 1, 7, 3) and out.dtype == torch.uint8
    assert out[0, 0, :, 0].tolist() == [0, 0, 63, 127, 254, 255, 255]


def test_pipeline_moves_with_to(tiny_pipeline):
    pipe = tiny_pipeline().to(torch.device("cpu"), torch.bfloat16)
    assert pipe.unet.dtype == torch.bfloat16 and pipe.classifier.dtype == torch.bfloat16
    out = pipe(class_labels=[0], num_inference_steps=2, output_type="latent").images
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_from_pretrained_in_a_fresh_interpreter(tiny_pipeline, tmp_path):
    """Loading needs no prior import of the model classes (diffusers only loads imported modules)."""
    import subprocess
    import sys

    tiny_pipeline().save_pretrained(tmp_path / "pipe")
    code = (
        "from guided_pipelines import ClassifierGuidedPipeline as P; "
        f"p = P.from_pretrained({str(tmp_path / 'pipe')!r}); print(type(p.unet).__name__, type(p.classifier).__name__)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["ADMUNet2DModel", "ADMClassifierModel"]
