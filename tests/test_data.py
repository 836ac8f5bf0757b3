"""guided_pipelines.data: bit-exact preprocessing against the original, image formats, corrupt files,
folder layouts, save_to_disk, streaming shards, seeded augmentation."""

import json
import math
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

from guided_pipelines.data import (
    ImageDataset,
    StreamingImageDataset,
    center_crop_arr,
    collate,
    load_image_dataset,
    preprocess_image,
    random_crop_arr,
    sample_rng,
    to_mode,
)

PRE = os.path.join(os.path.dirname(__file__), "fixtures", "preprocess")


def _cases():
    with open(os.path.join(PRE, "center_crop.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def crop_reference():
    from safetensors.numpy import load_file

    return load_file(os.path.join(PRE, "center_crop.safetensors"))


@pytest.mark.parametrize("case", _cases(), ids=lambda c: f"src{c['index']}-{c['mode']}-{c['image_size']}")
def test_center_crop_bit_exact(case, crop_reference):
    image = Image.open(os.path.join(PRE, f"src{case['index']}.png"))
    assert image.size == (case["width"], case["height"]) and image.mode == case["mode"]
    out = center_crop_arr(to_mode(image, 3), case["image_size"])
    expected = crop_reference[f"out{case['index']}"]
    assert out.dtype == np.uint8 and out.shape == expected.shape
    np.testing.assert_array_equal(out, expected)


def test_dataset_output_matches_reference_crop(tmp_path, crop_reference):
    """Through the whole loader (imagefolder → ImageDataset): [-1, 1] CHW float32 of the exact crop."""
    case = _cases()[0]
    os.makedirs(tmp_path / "a")
    Image.open(os.path.join(PRE, f"src{case['index']}.png")).save(tmp_path / "a" / "x.png")
    ds = load_image_dataset(str(tmp_path), image_size=case["image_size"], random_flip=False)
    item = ds[0]
    expected = crop_reference[f"out{case['index']}"].astype(np.float32) / 127.5 - 1
    assert item["image"].dtype == torch.float32
    assert item["image"].shape == (3, case["image_size"], case["image_size"])
    np.testing.assert_array_equal(item["image"].numpy(), expected.transpose(2, 0, 1))
    assert item["label"] == 0 and item["skipped"] == 0


def _reference_random_crop(pil_image, image_size, rng, min_frac=0.8, max_frac=1.0):
    """The original algorithm written out independently: BOX halving, BICUBIC, random window."""
    size = rng.randrange(math.ceil(image_size / max_frac), math.ceil(image_size / min_frac) + 1)
    img = pil_image
    while min(img.size) >= 2 * size:
        img = img.resize((img.size[0] // 2, img.size[1] // 2), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize((round(img.size[0] * scale), round(img.size[1] * scale)), resample=Image.BICUBIC)
    arr = np.array(img)
    y = rng.randrange(arr.shape[0] - image_size + 1)
    x = rng.randrange(arr.shape[1] - image_size + 1)
    return arr[y : y + image_size, x : x + image_size], size


def test_random_crop_matches_original_algorithm():
    image = Image.open(os.path.join(PRE, "src1.png")).convert("RGB")  # 517x389
    sizes = set()
    for seed in range(40):
        out = random_crop_arr(image, 64, random.Random(seed))
        expected, size = _reference_random_crop(image, 64, random.Random(seed))
        sizes.add(size)
        assert out.shape == (64, 64, 3)
        np.testing.assert_array_equal(out, expected)
    # short side resized to a random size in [ceil(64/1.0), ceil(64/0.8)] = [64, 80]
    assert min(sizes) >= 64 and max(sizes) <= 80 and len(sizes) > 5
    with pytest.raises(ValueError, match="min_crop_frac"):
        random_crop_arr(image, 64, random.Random(0), min_crop_frac=0.0)


def test_random_crop_and_flip_seeded_by_seed_epoch_index():
    image = Image.open(os.path.join(PRE, "src0.png"))
    a = preprocess_image(image, 32, True, True, sample_rng(0, 0, 5))
    b = preprocess_image(image, 32, True, True, sample_rng(0, 0, 5))
    assert torch.equal(a, b)
    others = [preprocess_image(image, 32, True, True, sample_rng(0, epoch, 5)) for epoch in range(1, 6)]
    assert any(not torch.equal(a, o) for o in others)
    # flips: about half of the indices, and a flip is exactly the mirrored center crop
    center = preprocess_image(image, 32, False, False)
    flipped = 0
    for index in range(200):
        out = preprocess_image(image, 32, False, True, sample_rng(3, 0, index))
        if torch.equal(out, center):
            continue
        assert torch.equal(out, center.flip(-1))
        flipped += 1
    assert 70 < flipped < 130


def _save(img, path, **kw):
    img.save(path, **kw)
    return path


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16", "1"])
def test_formats_become_rgb_or_gray(tmp_path, mode):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, (40, 50), dtype=np.uint16))
        assert img.mode.startswith("I;16")
        path = _save(img, tmp_path / "x.png")
    elif mode == "CMYK":
        path = _save(rgb.convert("CMYK"), tmp_path / "x.jpg", quality=95)
    else:
        path = _save(rgb.convert(mode), tmp_path / "x.png")
    loaded = Image.open(path)
    rgb_out = preprocess_image(loaded, 16, random_flip=False)
    gray_out = preprocess_image(Image.open(path), 16, random_flip=False, num_channels=1)
    assert rgb_out.shape == (3, 16, 16) and gray_out.shape == (1, 16, 16)
    for out in (rgb_out, gray_out):
        assert out.dtype == torch.float32 and out.min() >= -1 and out.max() <= 1
    if mode in ("L", "1", "I;16"):
        assert torch.equal(rgb_out[0], rgb_out[1]) and torch.equal(rgb_out[1], rgb_out[2])
    if mode == "RGBA":  # alpha dropped, as the original convert("RGB")
        ref = center_crop_arr(Image.open(path).convert("RGB"), 16).astype(np.float32) / 127.5 - 1
        np.testing.assert_array_equal(rgb_out.numpy(), ref.transpose(2, 0, 1))
    if mode == "I;16":  # 16-bit rescaled to 8 bits, not clipped to white
        assert rgb_out.std() > 0.1
    with pytest.raises(ValueError, match="num_channels"):
        preprocess_image(Image.open(path), 16, num_channels=4)


def _make_images(folder, names, size=(24, 20), seed=0):
    rng = np.random.default_rng(seed)
    for name in names:
        path = os.path.join(folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def test_imagefolder_layout_and_split_folders(tmp_path):
    _make_images(tmp_path / "train", ["n02/a.png", "n02/b.JPEG", "n01/c.png", "n01/sub/d.png", "n03/e.png"])
    _make_images(tmp_path / "validation", ["n01/v.png", "n02/w.png", "n03/x.png"])
    (tmp_path / "train" / "n03" / "notes.txt").write_text("not an image")
    ds = load_image_dataset(str(tmp_path), split="train", image_size=16, random_flip=False)
    assert isinstance(ds, ImageDataset)
    assert ds.class_names == ["n01", "n02", "n03"] and ds.num_classes == 3 and len(ds) == 5
    labels = sorted(ds[i]["label"] for i in range(len(ds)))
    assert labels == [0, 0, 1, 1, 2]
    val = load_image_dataset(str(tmp_path), split="validation", image_size=16)
    assert len(val) == 3 and val.class_names == ["n01", "n02", "n03"]
    # the split folder itself works too, and "val" is accepted for "validation"
    assert len(load_image_dataset(str(tmp_path / "train"), image_size=16)) == 5
    with pytest.raises(ValueError, match="no 'test'"):
        load_image_dataset(str(tmp_path), split="test", image_size=16)
    unconditional = load_image_dataset(str(tmp_path), image_size=16, class_cond=False)
    assert unconditional[0]["label"] == -1 and unconditional.num_classes is None


def test_original_prefix_layout(tmp_path):
    _make_images(tmp_path, ["zebra_1.png", "ant_2.png", "ant_10.jpg", "deep/zebra_3.png", "bee_x_y.png"])
    ds = load_image_dataset(str(tmp_path), image_size=16, random_flip=False)
    assert ds.class_names == ["ant", "bee", "zebra"]
    by_file = {os.path.basename(ds.hf[i]["image"]["path"]): ds[i]["label"] for i in range(len(ds))}
    assert by_file == {"ant_2.png": 0, "ant_10.jpg": 0, "bee_x_y.png": 1, "zebra_1.png": 2, "zebra_3.png": 2}


def test_corrupt_images_are_skipped_and_counted(tmp_path, caplog):
    _make_images(tmp_path, ["a/0.png", "a/1.png", "b/2.png", "b/3.png"])
    good = (tmp_path / "a" / "1.png").read_bytes()
    (tmp_path / "a" / "1.png").write_bytes(good[: len(good) // 2])  # truncated
    (tmp_path / "b" / "2.png").write_text("this is not a png")  # garbage
    ds = load_image_dataset(str(tmp_path), image_size=16, random_flip=False)
    assert len(ds) == 4
    with caplog.at_level("WARNING", logger="guided_pipelines.data"):
        items = [ds[i] for i in range(4)]
    assert [it["index"] for it in items] == [0, 2 + 1, 3, 3]  # 1 → (1 truncated, 2 garbage) → 3; 2 → 3
    assert [it["skipped"] for it in items] == [0, 2, 1, 0]
    assert ds.num_skipped == 3
    assert "skipping unreadable image" in caplog.text and "1.png" in caplog.text
    batch = collate(items)
    assert batch["image"].shape == (4, 3, 16, 16) and int(batch["skipped"].sum()) == 3
    # a DataLoader over the whole set runs through without raising
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate)
    assert sum(len(b["image"]) for b in loader) == 4
    (tmp_path / "a" / "0.png").write_text("x")
    (tmp_path / "b" / "3.png").write_text("x")
    with pytest.raises(RuntimeError, match="unreadable"):
        load_image_dataset(str(tmp_path), image_size=16)[0]


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    import datasets

    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)) for _ in range(4)]
    features = datasets.Features({"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=["p", "q"])})
    ds = datasets.Dataset.from_dict({"img": images, "fine_label": [0, 1, 1, 0]}, features=features)
    ds.save_to_disk(str(tmp_path / "single"))
    loaded = load_image_dataset(str(tmp_path / "single"), image_size=16, random_flip=False)
    assert loaded.image_column == "img" and loaded.label_column == "fine_label"
    assert loaded.class_names == ["p", "q"] and [loaded[i]["label"] for i in range(4)] == [0, 1, 1, 0]
    expected = center_crop_arr(images[2], 16).astype(np.float32) / 127.5 - 1
    np.testing.assert_array_equal(loaded[2]["image"].numpy(), expected.transpose(2, 0, 1))
    datasets.DatasetDict({"train": ds, "validation": ds.select([0])}).save_to_disk(str(tmp_path / "dict"))
    assert len(load_image_dataset(str(tmp_path / "dict"), split="validation", image_size=16)) == 1
    with pytest.raises(ValueError, match="no split 'test'"):
        load_image_dataset(str(tmp_path / "dict"), split="test", image_size=16)
    # an in-memory Dataset works as a source as well; a missing label column is explained
    unlabeled = datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()}))
    with pytest.raises(ValueError, match="label column"):
        load_image_dataset(unlabeled, image_size=16)
    assert load_image_dataset(unlabeled, image_size=16, class_cond=False)[1]["image"].shape == (3, 16, 16)


def test_one_channel_dataset(tmp_path):
    _make_images(tmp_path, ["a/0.png", "b/1.png"])
    ds = load_image_dataset(str(tmp_path), image_size=8, num_channels=1, random_flip=False)
    item = ds[1]
    assert item["image"].shape == (1, 8, 8)
    gray = center_crop_arr(Image.open(tmp_path / "b" / "1.png").convert("L"), 8).astype(np.float32) / 127.5 - 1
    np.testing.assert_array_equal(item["image"][0].numpy(), gray)


def test_missing_and_empty_sources(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_dataset(str(tmp_path / "nope"), image_size=16)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_dataset("./relative/missing/folder", image_size=16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        load_image_dataset(str(tmp_path / "empty"), image_size=16)
    with pytest.raises(ValueError, match="layout"):
        load_image_dataset(str(tmp_path), image_size=16, layout="zip")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises((FileNotFoundError, PermissionError), match="nobody-xyz/no-such-dataset"):
        load_image_dataset("nobody-xyz/no-such-dataset", image_size=16)


def test_streaming_shards_cover_the_data_once_and_resume(tmp_path):
    names = [f"c{i % 3}/{i:02d}.png" for i in range(12)]
    _make_images(tmp_path, names)
    kwargs = dict(image_size=8, streaming=True, shuffle_buffer_size=4, seed=3)
    shards = [load_image_dataset(str(tmp_path), rank=r, world_size=2, **kwargs) for r in range(2)]
    assert all(isinstance(s, StreamingImageDataset) for s in shards)
    seen = []
    for shard in shards:
        shard.repeat = False
        seen.append([item["image"] for item in shard])
    assert len(seen[0]) + len(seen[1]) == 12 and len(seen[0]) == 6
    flat = torch.stack(seen[0] + seen[1]).flatten(1)
    assert len({tuple(row.tolist()) for row in flat}) == 12  # disjoint shards, every image once
    # resuming after position k continues with exactly the same examples
    full = load_image_dataset(str(tmp_path), **kwargs)
    stream = iter(full)
    first = [next(stream) for _ in range(15)]  # crosses into the second epoch
    resumed = load_image_dataset(str(tmp_path), **kwargs)
    resumed.start_positions = {0: first[9]["index"]}
    again = iter(resumed)
    for expected in first[10:]:
        got = next(again)
        assert got["index"] == expected["index"] and torch.equal(got["image"], expected["image"])
