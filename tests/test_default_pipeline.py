"""The shipped default pipeline (guided_pipelines/default_pipeline: the Fashion-MNIST ADM + noisy
classifier trained with training/configs/fashion-mnist-*.yaml) loads offline and samples."""

import os

import numpy as np
import pytest
import torch

from guided_pipelines import ADMClassifierModel, ADMScheduler, ADMUNet2DModel, ClassifierGuidedPipeline

DEFAULT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "guided_pipelines", "default_pipeline")
NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]



@pytest.fixture(scope="module")
def pipe():
    p = ClassifierGuidedPipeline.from_pretrained(DEFAULT)  # float16 files load as float32 by default
    p.set_progress_bar_config(disable=True)
    return p


def test_folder_is_small_and_float16():
    from safetensors import safe_open

    total = 0
    for root, _, files in os.walk(DEFAULT):
        for f in files:
            if f.endswith(".safetensors"):
                total += os.path.getsize(os.path.join(root, f))
                with safe_open(os.path.join(root, f), "pt") as st:
                    assert all(st.get_slice(k).get_dtype() == "F16" for k in st.keys())
    assert 0 < total <= 25 * 2**20


def test_components(pipe):
    assert isinstance(pipe.unet, ADMUNet2DModel)
    assert isinstance(pipe.classifier, ADMClassifierModel)
    assert isinstance(pipe.scheduler, ADMScheduler)
    assert pipe.unet.dtype == torch.float32 and pipe.classifier.dtype == torch.float32
    assert pipe.id2label == dict(enumerate(NAMES))
    assert pipe.config.recommended_classifier_scale is not None and pipe.config.recommended_classifier_scale > 0
    assert (pipe.unet.config.sample_size, pipe.unet.config.in_channels, pipe.unet.config.num_classes) == (32, 1, 10)
    assert pipe.scheduler.config.variance_type == "learned_range"


def test_guided_sampling_is_deterministic_and_has_every_label(pipe):
    labels = ["Sneaker", "Bag", 1, "ankle boot"]  # names (any case) or ids
    scale = pipe.config.recommended_classifier_scale

    def run(seed):
        return pipe(class_labels=labels, classifier_scale=scale, respacing="ddim4", use_ddim=True,
                    generator=torch.Generator().manual_seed(seed), output_type="np")

    a, b, c = run(0), run(0), run(1)
    assert a.class_labels.tolist() == [7, 8, 1, 9]
    assert set(a.class_labels.tolist()) == {pipe.get_label_ids(x)[0] for x in labels}
    assert a.images.shape == (4, 32, 32, 1)
    assert np.isfinite(a.images).all() and a.images.min() >= 0 and a.images.max() <= 1
    np.testing.assert_array_equal(a.images, b.images)
    assert np.abs(a.images - c.images).max() > 0.05


def test_pil_output_one_image_per_label(pipe):
    out = pipe(class_labels=list(range(10)), classifier_scale=1.0, respacing="ddim2", use_ddim=True,
               generator=torch.Generator().manual_seed(0))
    assert len(out.images) == 10 and out.images[0].size == (32, 32)
    assert sorted(out.class_labels.tolist()) == list(range(10))
