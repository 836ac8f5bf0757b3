"""Fashion-MNIST (Xiao et al. 2017) from the Debian IDX files → a ``datasets.DatasetDict`` on disk.

    apt-get install -y dataset-fashion-mnist          # /usr/share/datasets/fashion-mnist/*.gz
    python training/fashion_mnist.py --out runs/fashion-mnist
    # after training (train_diffusion.py, train_classifier.py): the shipped float16 pipeline folder
    python training/fashion_mnist.py ship --unet runs/fm-unet/ema_0.99 --classifier runs/fm-clf/classifier \
        --out guided_pipelines/default_pipeline --scale 2.0

Each split (``train``: 60,000, ``test``: 10,000) has an ``image`` column (``datasets.Image``, 32×32
grayscale PNG: the 28×28 original padded with 2 black pixels on every side) and a ``label`` column
(``datasets.ClassLabel`` with the ten class names). The folder is what ``guided_pipelines.data.
load_image_dataset(<folder>, num_channels=1)`` and the training scripts' ``--dataset`` read.
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import struct

import numpy as np

IDX_DIR = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx(path: str) -> np.ndarray:
    """An IDX file (optionally gzipped) → numpy array (uint8 data, big-endian header)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {data[:4]!r})")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {shape}, got {arr.size} values")
    return arr.reshape(shape)


def load_split(split: str, idx_dir: str = IDX_DIR, pad: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28+2·pad, 28+2·pad), labels int64 (N,)) of one split, padded with black."""
    img_file, lbl_file = FILES[split]
    images = read_idx(os.path.join(idx_dir, img_file))
    labels = read_idx(os.path.join(idx_dir, lbl_file)).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{split}: {len(images)} images but {len(labels)} labels")
    if pad:
        images = np.pad(images, ((0, 0), (pad, pad), (pad, pad)), mode="constant", constant_values=0)
    return images, labels


def to_dataset(images: np.ndarray, labels: np.ndarray):
    """uint8 images + int labels → ``datasets.Dataset`` (PNG-encoded ``image``, ``ClassLabel`` label)."""
    import datasets
    from PIL import Image

    def png(a):
        buf = io.BytesIO()
        Image.fromarray(a, mode="L").save(buf, format="PNG")
        return {"bytes": buf.getvalue(), "path": None}

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASS_NAMES)})
    return datasets.Dataset.from_dict(
        {"image": [png(a) for a in images], "label": labels.tolist()}, features=features
    )


def build(out: str, idx_dir: str = IDX_DIR, pad: int = 2):
    import datasets

    dd = datasets.DatasetDict({split: to_dataset(*load_split(split, idx_dir, pad)) for split in FILES})
    dd.save_to_disk(out)
    return dd


def ship(unet_dir: str, classifier_dir: str, out: str, scale: float | None, dtype: str = "float16"):
    """Combine a trained UNet pipeline folder (EMA) and a classifier folder into one
    ``ClassifierGuidedPipeline`` folder, weights cast to ``dtype`` (safetensors)."""
    import torch

    from guided_pipelines import ADMClassifierModel, ClassifierGuidedPipeline

    base = ClassifierGuidedPipeline.from_pretrained(unet_dir)
    cdir = os.path.join(classifier_dir, "classifier") if os.path.isdir(os.path.join(classifier_dir, "classifier")) else classifier_dir
    classifier = ADMClassifierModel.from_pretrained(cdir)
    pipe = ClassifierGuidedPipeline(
        unet=base.unet, scheduler=base.scheduler, classifier=classifier,
        id2label=dict(enumerate(CLASS_NAMES)), recommended_classifier_scale=scale,
    )
    pipe.to(getattr(torch, dtype))
    pipe.save_pretrained(out, safe_serialization=True)
    return pipe


def main(argv=None):
    if argv is None:
        import sys

        argv = sys.argv[1:]
    if argv[:1] == ["ship"]:
        q = argparse.ArgumentParser(prog="fashion_mnist.py ship", description=ship.__doc__)
        q.add_argument("--unet", required=True, help="pipeline folder of the trained UNet (OUTPUT/ema_RATE)")
        q.add_argument("--classifier", required=True, help="classifier folder (OUTPUT or OUTPUT/classifier)")
        q.add_argument("--out", default="guided_pipelines/default_pipeline")
        q.add_argument("--scale", type=float, default=None, help="recommended_classifier_scale")
        q.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
        a = q.parse_args(argv[1:])
        ship(a.unet, a.classifier, a.out, a.scale, a.dtype)
        print("wrote", a.out)
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--idx_dir", default=IDX_DIR, help="folder with the four *-ubyte.gz IDX files")
    p.add_argument("--out", default="runs/fashion-mnist", help="save_to_disk folder to write")
    p.add_argument("--pad", type=int, default=2, help="black border added on every side (28 → 32)")
    args = p.parse_args(argv)
    dd = build(args.out, args.idx_dir, args.pad)
    print(dd)
    # Check it goes through the project's own loader.
    from guided_pipelines.data import load_image_dataset

    ds = load_image_dataset(args.out, image_size=28 + 2 * args.pad, num_channels=1, random_flip=False)
    ex = ds[0]
    print("loader:", len(ds), tuple(ex["image"].shape), float(ex["image"].min()), float(ex["image"].max()), ex["label"])


if __name__ == "__main__":
    main()
