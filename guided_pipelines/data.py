"""Image datasets for training ADM models and noisy classifiers, built on 🤗 ``datasets``.

Preprocessing reproduces the original ``image_datasets.py`` of guided-diffusion (Dhariwal & Nichol
2021) bit for bit: repeated BOX halving while the short side is at least twice the target, one
BICUBIC resize of the short side to ``image_size``, a center crop (or the random-crop variant that
first resizes the short side to a random size in ``[image_size/max_frac, image_size/min_frac]``),
an optional horizontal flip, and the map ``x/127.5 − 1`` to ``[-1, 1]``, returned CHW float32.

Sources (:func:`load_image_dataset`): a Hub dataset id (``"ILSVRC/imagenet-1k"``), a local folder in
imagefolder layout (one sub-folder per class, e.g. ImageNet's synset folders), a local folder in the
original repository's layout (class = file-name prefix before the first ``_``), a folder written
by ``Dataset.save_to_disk``/``DatasetDict.save_to_disk``, or a ``datasets.Dataset``/``IterableDataset``.

Randomness (random crop, flip) is a function of ``(seed, epoch, index)`` only, so runs are
reproducible, independent of worker and process count, and resumable. Images that cannot be
decoded are skipped: they are counted, logged, and replaced by the next readable image of the stream.
"""

from __future__ import annotations

import io
import logging
import math
import os
import random
import warnings

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
SPLIT_NAMES = ("train", "training", "validation", "valid", "val", "test", "eval", "evaluation")
LAYOUTS = ("auto", "imagefolder", "prefix", "disk", "hub")
# Errors PIL and the codecs raise for unreadable, truncated or malformed files.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError, TypeError, KeyError)


# --------------------------------------------------------------------------------------------------
# Preprocessing (original ``center_crop_arr`` / ``random_crop_arr``)


def _halve_then_resize(pil_image: Image.Image, smaller_dim_size: int) -> Image.Image:
    # BOX-halve while the short side is ≥ 2× the target (the original's manual "reducing_gap"), then
    # one BICUBIC resize so that the short side becomes `smaller_dim_size`.
    while min(*pil_image.size) >= 2 * smaller_dim_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = smaller_dim_size / min(*pil_image.size)
    return pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """The original center-crop preprocessing: uint8 array (image_size, image_size[, C])."""
    arr = np.array(_halve_then_resize(pil_image, image_size))
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


def random_crop_arr(
    pil_image: Image.Image,
    image_size: int,
    rng: random.Random | None = None,
    min_crop_frac: float = 0.8,
    max_crop_frac: float = 1.0,
) -> np.ndarray:
    """The original random-crop variant: the short side is resized to a random size in
    ``[ceil(image_size/max_crop_frac), ceil(image_size/min_crop_frac)]``, then a random
    ``image_size`` square is cut. ``rng`` is a ``random.Random`` (the module's global one if None)."""
    if not 0 < min_crop_frac <= max_crop_frac <= 1:
        raise ValueError(f"need 0 < min_crop_frac <= max_crop_frac <= 1, got {min_crop_frac}, {max_crop_frac}")
    rng = rng if rng is not None else random
    smaller_dim_size = rng.randrange(math.ceil(image_size / max_crop_frac), math.ceil(image_size / min_crop_frac) + 1)
    arr = np.array(_halve_then_resize(pil_image, smaller_dim_size))
    crop_y = rng.randrange(arr.shape[0] - image_size + 1)
    crop_x = rng.randrange(arr.shape[1] - image_size + 1)
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


def to_mode(pil_image: Image.Image, num_channels: int = 3) -> Image.Image:
    """Grayscale, palette, CMYK, RGBA, 16-bit … → RGB (``num_channels=3``) or L (``num_channels=1``).

    Alpha is dropped as in the original (``convert("RGB")``). 16/32-bit integer and float images are
    rescaled to 8 bits first (PIL's own conversion would clip them)."""
    if num_channels not in (1, 3):
        raise ValueError(f"num_channels must be 1 (grayscale) or 3 (RGB), got {num_channels}")
    target = "RGB" if num_channels == 3 else "L"
    if pil_image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(pil_image, dtype=np.float64)
        peak = 65535.0 if pil_image.mode.startswith("I;16") or arr.max() > 255 else 255.0
        if pil_image.mode == "F" and arr.max() <= 1.0:
            peak = 1.0
        pil_image = Image.fromarray(np.clip(np.round(arr / peak * 255.0), 0, 255).astype(np.uint8), mode="L")
    if pil_image.mode != target:
        pil_image = pil_image.convert(target)
    return pil_image


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The per-sample random stream for crop and flip: a function of (seed, epoch, index) only."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(index)]).generate_state(2, np.uint64)
    return random.Random(int(state[0]) << 64 | int(state[1]))


def preprocess_image(
    pil_image: Image.Image,
    image_size: int,
    random_crop: bool = False,
    random_flip: bool = True,
    rng: random.Random | None = None,
    num_channels: int = 3,
) -> torch.Tensor:
    """PIL image → ``[-1, 1]`` float32 tensor (num_channels, image_size, image_size), as the original
    ``ImageDataset.__getitem__`` (crop, then flip with probability ½, then ``x/127.5 − 1``)."""
    rng = rng if rng is not None else random.Random()
    pil_image = to_mode(pil_image, num_channels)
    arr = random_crop_arr(pil_image, image_size, rng) if random_crop else center_crop_arr(pil_image, image_size)
    if random_flip and rng.random() < 0.5:
        arr = arr[:, ::-1]
    arr = arr.astype(np.float32) / 127.5 - 1
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def decode_image(value) -> Image.Image:
    """Open and fully decode an image given as a path, bytes, a ``{"bytes", "path"}`` dict (the
    undecoded ``datasets.Image`` value), a numpy array or a PIL image. Raises on unreadable data."""
    if isinstance(value, Image.Image):
        value.load()
        return value
    if isinstance(value, np.ndarray):
        return Image.fromarray(value)
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            value = value["bytes"]
        elif value.get("path"):
            value = value["path"]
        else:
            raise ValueError("image entry has neither bytes nor a path")
    if isinstance(value, (bytes, bytearray)):
        pil_image = Image.open(io.BytesIO(value))
    elif isinstance(value, (str, os.PathLike)):
        pil_image = Image.open(value)
    else:
        raise TypeError(f"cannot decode an image from {type(value).__name__}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "Palette images with Transparency expressed in bytes"
        pil_image.load()
    return pil_image


# --------------------------------------------------------------------------------------------------
# Local folders


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_image_files(folder: str) -> list[str]:
    """All image files under ``folder``, recursively, in sorted order (hidden entries skipped)."""
    found = []
    for entry in sorted(os.listdir(folder)):
        if entry.startswith("."):
            continue
        path = os.path.join(folder, entry)
        if os.path.isdir(path):
            found.extend(list_image_files(path))
        elif _is_image(entry):
            found.append(path)
    return found


def _is_saved_dataset(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "dataset_dict.json")) or (
        os.path.isfile(os.path.join(folder, "state.json")) and os.path.isfile(os.path.join(folder, "dataset_info.json"))
    )


def _subdirs(folder: str) -> list[str]:
    return sorted(e for e in os.listdir(folder) if not e.startswith(".") and os.path.isdir(os.path.join(folder, e)))


def _detect_layout(folder: str) -> str:
    if _is_saved_dataset(folder):
        return "disk"
    entries = [e for e in os.listdir(folder) if not e.startswith(".")]
    if any(_is_image(e) and os.path.isfile(os.path.join(folder, e)) for e in entries):
        return "prefix"
    if _subdirs(folder):
        return "imagefolder"
    data_files = (".parquet", ".arrow", ".csv", ".json", ".jsonl", ".tar")
    if any(e.endswith(data_files) for e in entries):
        return "hub"
    raise ValueError(
        f"no images found in {folder!r}: expected class sub-folders (imagefolder layout), image files named "
        "CLASS_xxx.png (the original layout), or a folder written by save_to_disk"
    )


def _folder_split(folder: str, split: str) -> str:
    """``folder/split`` when ``folder`` holds split sub-folders (train/, validation/, …)."""
    subdirs = _subdirs(folder)
    if subdirs and all(d.lower() in SPLIT_NAMES for d in subdirs):
        aliases = {"validation": ("validation", "valid", "val"), "train": ("train", "training"), "test": ("test",)}
        for name in aliases.get(split, (split,)):
            if name in subdirs:
                return os.path.join(folder, name)
        raise ValueError(f"{folder!r} has splits {', '.join(subdirs)} but no {split!r}; pass one of them as split")
    return folder


def _local_file_table(folder: str, layout: str, class_cond: bool):
    """(paths, labels or None, class names or None) of a local image folder."""
    if layout == "imagefolder":
        classes = _subdirs(folder)
        paths, labels = [], []
        for label, name in enumerate(classes):
            files = list_image_files(os.path.join(folder, name))
            paths.extend(files)
            labels.extend([label] * len(files))
        stray = [e for e in os.listdir(folder) if _is_image(e)]
        if stray:
            logger.warning("ignoring %d image files at the top of imagefolder %s", len(stray), folder)
    else:
        paths = list_image_files(folder)
        classes = sorted({os.path.basename(p).split("_")[0] for p in paths}) if class_cond else None
        index = {c: i for i, c in enumerate(classes or [])}
        labels = [index[os.path.basename(p).split("_")[0]] for p in paths] if class_cond else None
    if not paths:
        raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {folder!r}")
    if layout == "imagefolder" and class_cond:
        empty = [c for c in classes if not any(lbl == classes.index(c) for lbl in labels)]
        if empty:
            logger.warning("class folders without images in %s: %s", folder, ", ".join(empty[:10]))
    return paths, (labels if class_cond else None), (classes if class_cond else None)


# --------------------------------------------------------------------------------------------------
# Datasets


def _find_column(features, names, kind) -> str | None:
    import datasets

    for name, feature in features.items():
        if kind == "image" and isinstance(feature, datasets.Image):
            return name
        if kind == "label" and isinstance(feature, datasets.ClassLabel):
            return name
    for name in names:
        if name in features:
            return name
    return None


class _ColumnsMixin:
    def _setup_columns(self, hf, image_column, label_column, class_cond):
        import datasets

        features = hf.features
        if features is None:  # streaming datasets of unknown schema
            features = {}
        self.image_column = image_column or _find_column(features, ("image", "img", "png", "jpg", "jpeg"), "image")
        if self.image_column is None or (features and self.image_column not in features):
            raise ValueError(
                f"cannot find the image column among {list(features)}; pass image_column=<name> "
                "(--image_column on the command line)"
            )
        self.label_column = None
        self.class_names = None
        self.num_classes = None
        if class_cond:
            self.label_column = label_column or _find_column(features, ("label", "labels", "class", "cls", "target"), "label")
            if self.label_column is None or (features and self.label_column not in features):
                raise ValueError(
                    f"class-conditional training needs labels, but the dataset has no label column among {list(features)}; "
                    "pass label_column=<name> (--label_column), or train an unconditional model (num_classes null)"
                )
            feature = features.get(self.label_column) if features else None
            if isinstance(feature, datasets.ClassLabel):
                self.class_names = list(feature.names)
                self.num_classes = feature.num_classes
        if features and isinstance(features.get(self.image_column), datasets.Image):
            hf = hf.cast_column(self.image_column, datasets.Image(decode=False))
        return hf

    def _setup_common(self, hf_dataset, image_size, class_cond, random_crop, random_flip, num_channels, seed,
                      image_column, label_column, num_classes, class_names):  # fmt: skip
        """Columns, classes and preprocessing options shared by the map-style and streaming datasets."""
        self.hf = self._setup_columns(hf_dataset, image_column, label_column, class_cond)
        if class_names is not None:
            self.class_names, self.num_classes = list(class_names), len(class_names)
        if num_classes is not None:
            self.num_classes = num_classes
        self.image_size = image_size
        self.class_cond = class_cond
        self.random_crop = random_crop
        self.random_flip = random_flip
        self.num_channels = num_channels
        self.seed = seed

    def _label(self, example) -> int:
        if self.label_column is None:
            return -1
        label = example[self.label_column]
        return int(label)


class ImageDataset(torch.utils.data.Dataset, _ColumnsMixin):
    """Map-style training dataset over a ``datasets.Dataset``.

    ``dataset[i]`` or ``dataset[(i, epoch)]`` → ``{"image": (C, S, S) float32 in [-1, 1], "label": int
    (-1 when unconditional), "index": the index actually used, "skipped": how many unreadable images
    were passed over to produce it}``. Random crop and flip depend on ``(seed, epoch, index)`` only."""

    def __init__(
        self,
        hf_dataset,
        image_size: int,
        class_cond: bool = True,
        random_crop: bool = False,
        random_flip: bool = True,
        num_channels: int = 3,
        seed: int = 0,
        image_column: str | None = None,
        label_column: str | None = None,
        num_classes: int | None = None,
        class_names: list | None = None,
    ):
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self._setup_common(hf_dataset, image_size, class_cond, random_crop, random_flip, num_channels, seed,
                           image_column, label_column, num_classes, class_names)  # fmt: skip
        if class_cond and self.num_classes is None and len(self.hf):
            labels = self.hf[self.label_column]
            self.num_classes = int(max(labels)) + 1
        self.epoch = 0
        self.num_skipped = 0  # in this process (and worker); the per-sample "skipped" field is global
        if len(self.hf) == 0:
            raise ValueError("the dataset is empty")

    def __len__(self) -> int:
        return len(self.hf)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, self.epoch)
        n = len(self.hf)
        for skipped in range(min(n, 1000)):
            i = (int(index) + skipped) % n
            example = self.hf[i]
            try:
                pil_image = decode_image(example[self.image_column])
                image = preprocess_image(
                    pil_image,
                    self.image_size,
                    self.random_crop,
                    self.random_flip,
                    sample_rng(self.seed, epoch, int(index)),  # the slot's stream, also for a substitute
                    self.num_channels,
                )
            except DECODE_ERRORS as err:
                self.num_skipped += 1
                where = _describe(example[self.image_column], i)
                logger.warning("skipping unreadable image %s (%s: %s)", where, type(err).__name__, err)
                continue
            label = self._label(example)
            if self.class_cond and self.num_classes is not None and not 0 <= label < self.num_classes:
                raise ValueError(f"example {i} has label {label}, outside [0, {self.num_classes - 1}]")
            return {"image": image, "label": label, "index": i, "skipped": skipped}
        raise RuntimeError(f"{min(n, 1000)} consecutive images from index {index} are unreadable; is the dataset corrupt?")


def _describe(value, index) -> str:
    if isinstance(value, dict) and value.get("path"):
        return f"{value['path']!r} (index {index})"
    return f"at index {index}"


class StreamingImageDataset(torch.utils.data.IterableDataset, _ColumnsMixin):
    """Iterable training dataset over a streaming ``datasets.IterableDataset``.

    Sharded across processes with ``datasets.distributed.split_dataset_by_node`` (and across
    DataLoader workers the same way), shuffled with a seeded buffer re-seeded every epoch, repeated
    forever. Yields the dicts of :class:`ImageDataset` plus ``worker``; ``index`` is the raw position
    in this process's (worker's) stream. Setting ``start_positions[worker] = index`` of the last
    consumed example resumes exactly after it (the stream is re-read up to there, not decoded)."""

    def __init__(
        self,
        hf_dataset,
        image_size: int,
        class_cond: bool = True,
        random_crop: bool = False,
        random_flip: bool = True,
        num_channels: int = 3,
        seed: int = 0,
        image_column: str | None = None,
        label_column: str | None = None,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer_size: int = 1000,
        num_classes: int | None = None,
        class_names: list | None = None,
        repeat: bool = True,
    ):
        self._setup_common(hf_dataset, image_size, class_cond, random_crop, random_flip, num_channels, seed,
                           image_column, label_column, num_classes, class_names)  # fmt: skip
        self.rank = rank
        self.world_size = world_size
        self.shuffle_buffer_size = shuffle_buffer_size
        self.repeat = repeat
        self.start_positions = {}  # worker id -> raw stream position to resume after
        self.num_skipped = 0

    def _stream(self, epoch: int):
        from datasets.distributed import split_dataset_by_node

        ds = self.hf
        if self.shuffle_buffer_size and self.shuffle_buffer_size > 1:
            ds = ds.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer_size)
            ds.set_epoch(epoch)
        if self.world_size > 1:
            ds = split_dataset_by_node(ds, rank=self.rank, world_size=self.world_size)
        info = torch.utils.data.get_worker_info()
        if info is not None and info.num_workers > 1:
            ds = split_dataset_by_node(ds, rank=info.id, world_size=info.num_workers)
        return ds

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        start = int(self.start_positions.get(worker, 0))
        position = 0  # raw examples of this process (worker) passed, across epochs
        epoch = 0
        skipped = 0
        while True:
            produced = False
            for example in self._stream(epoch):
                produced = True
                position += 1
                if position <= start:
                    continue
                try:
                    pil_image = decode_image(example[self.image_column])
                    image = preprocess_image(
                        pil_image,
                        self.image_size,
                        self.random_crop,
                        self.random_flip,
                        sample_rng(self.seed, epoch, position * 65536 + self.rank * 256 + worker),
                        self.num_channels,
                    )
                except DECODE_ERRORS as err:
                    skipped += 1
                    self.num_skipped += 1
                    logger.warning("skipping unreadable streamed image %d (%s: %s)", position, type(err).__name__, err)
                    continue
                label = self._label(example)
                yield {"image": image, "label": label, "index": position, "skipped": skipped, "worker": worker}
                skipped = 0
            if not produced:
                raise ValueError("the streaming dataset yielded no examples for this process")
            if not self.repeat:
                return
            epoch += 1


def load_image_dataset(
    source,
    split: str = "train",
    image_size: int = 64,
    class_cond: bool = True,
    random_crop: bool = False,
    random_flip: bool = True,
    streaming: bool = False,
    num_channels: int = 3,
    seed: int = 0,
    layout: str = "auto",
    image_column: str | None = None,
    label_column: str | None = None,
    rank: int = 0,
    world_size: int = 1,
    shuffle_buffer_size: int = 1000,
    cache_dir: str | None = None,
    token: str | bool | None = None,
):
    """Load a training image dataset.

    ``source``: a Hub dataset id (``"ILSVRC/imagenet-1k"``; the token comes from ``HF_TOKEN`` or
    ``huggingface-cli login`` unless ``token`` is given), a local folder (imagefolder layout, the
    original ``CLASS_xxx.png`` layout, a ``save_to_disk`` folder, or data files; a folder whose
    sub-folders are split names uses ``folder/split``), or a ``datasets.Dataset``/``IterableDataset``.
    ``layout`` forces one of ``imagefolder``, ``prefix``, ``disk``, ``hub``.

    Returns an :class:`ImageDataset` (map-style; shard it with a sampler, e.g.
    ``training/train_utils.StepSampler``) or, with ``streaming=True`` or an ``IterableDataset``
    source, a :class:`StreamingImageDataset` already split for ``rank``/``world_size``."""
    import datasets

    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
        if not os.path.isdir(source):
            raise FileNotFoundError(f"dataset folder {source!r} does not exist")
    class_names = None
    common = dict(
        image_size=image_size,
        class_cond=class_cond,
        random_crop=random_crop,
        random_flip=random_flip,
        num_channels=num_channels,
        seed=seed,
        image_column=image_column,
        label_column=label_column,
    )
    if isinstance(source, (datasets.Dataset, datasets.IterableDataset)):
        hf = source
    elif isinstance(source, datasets.DatasetDict):
        hf = _pick_split(source, split, "the DatasetDict")
    elif isinstance(source, str) and (os.path.isdir(source) or layout in ("imagefolder", "prefix", "disk")):
        folder = source
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"dataset folder {folder!r} does not exist")
        kind = layout if layout != "auto" else _detect_layout(folder)
        if kind == "disk":
            loaded = datasets.load_from_disk(folder)
            hf = _pick_split(loaded, split, folder) if isinstance(loaded, datasets.DatasetDict) else loaded
        elif kind == "hub":
            hf = _load_hub(folder, split, streaming, cache_dir, token)
        else:
            if kind == "imagefolder" or layout == "auto":
                folder = _folder_split(folder, split)
                if layout == "auto" and kind == "imagefolder":
                    kind = _detect_layout(folder)
                    if kind not in ("imagefolder", "prefix"):
                        raise ValueError(f"{folder!r} does not hold image files")
            paths, labels, class_names = _local_file_table(folder, kind, class_cond)
            columns = {"image": paths}
            features = {"image": datasets.Image(decode=False)}
            if labels is not None:
                columns["label"] = labels
                features["label"] = datasets.ClassLabel(names=class_names)
            hf = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
            common.update(image_column="image", label_column="label" if labels is not None else None)
            if streaming:
                hf = hf.to_iterable_dataset(num_shards=max(1, min(64, len(paths))))
    elif isinstance(source, str):
        if source.startswith((".", "/", "~")) or source.count("/") > 1 or os.sep != "/" and os.sep in source:
            raise FileNotFoundError(f"dataset folder {source!r} does not exist")
        hf = _load_hub(source, split, streaming, cache_dir, token)
    else:
        raise TypeError(f"source must be a path, a Hub dataset id or a datasets.Dataset, not {type(source).__name__}")

    if streaming and isinstance(hf, datasets.Dataset):
        hf = hf.to_iterable_dataset(num_shards=max(1, min(64, len(hf))))
    if isinstance(hf, datasets.IterableDataset):
        return StreamingImageDataset(
            hf, rank=rank, world_size=world_size, shuffle_buffer_size=shuffle_buffer_size, class_names=class_names, **common
        )
    return ImageDataset(hf, class_names=class_names, **common)


def _pick_split(dataset_dict, split, where):
    if split not in dataset_dict:
        raise ValueError(f"{where} has no split {split!r}; available: {', '.join(dataset_dict)}")
    return dataset_dict[split]


def _load_hub(source, split, streaming, cache_dir, token):
    import datasets

    kwargs = dict(split=split, streaming=streaming, cache_dir=cache_dir)
    if token is not None:
        kwargs["token"] = token
    try:
        return datasets.load_dataset(source, **kwargs)
    except Exception as err:  # noqa: BLE001 - re-raised with the fix
        text = f"{type(err).__name__}: {err}"
        if "gated" in text.lower() or "401" in text or "403" in text or "authenticat" in text.lower():
            raise PermissionError(
                f"cannot read dataset {source!r}: it is gated or private ({text}). Accept its terms on "
                f"https://huggingface.co/datasets/{source} and set HF_TOKEN (or run `hf auth login`)"
            ) from err
        if isinstance(err, ValueError) and "split" in str(err).lower():
            raise ValueError(f"dataset {source!r} has no split {split!r}: {err}") from err
        raise FileNotFoundError(
            f"cannot load dataset {source!r} ({text}); pass an existing local folder or a Hub dataset id "
            "(e.g. ILSVRC/imagenet-1k)"
        ) from err


def collate(examples: list[dict]) -> dict:
    """Stack examples from :class:`ImageDataset`/:class:`StreamingImageDataset` into a batch."""
    batch = {"image": torch.stack([e["image"] for e in examples])}
    for key in ("label", "index", "skipped", "worker"):
        if key in examples[0]:
            batch[key] = torch.tensor([e[key] for e in examples], dtype=torch.long)
    return batch
