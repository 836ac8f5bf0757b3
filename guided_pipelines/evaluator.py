"""``guided-pipelines evaluate REF.npz SAMPLES.npz``: the ADM evaluator's numbers in PyTorch.

Reproduces openai/guided-diffusion ``evaluations/evaluator.py`` (Dhariwal & Nichol 2021, appendix
on evaluation): Inception Score, FID, sFID, precision and recall of a sample batch against one of the
released reference batches (``VIRTUAL_imagenet128_labeled.npz`` etc.), plus the number of samples N,
FID_inf / IS_inf (Chong & Forsyth 2020) and a warning when N is below the paper's 50,000.

Batches are ``.npz`` files whose ``arr_0`` holds uint8 NHWC images (what the original sampling
scripts and ``guided-pipelines generate`` write); reference batches may also store ``mu``, ``sigma``
(pool features) and ``mu_s``, ``sigma_s`` (spatial features), which are then used for FID / sFID as
the original does. Images are streamed in batches (memory-mapped when the archive is uncompressed),
and activations are cached per file (keyed by path, size, mtime and the Inception weights).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import warnings
import zipfile
from dataclasses import dataclass

import numpy as np

from guided_pipelines import metrics

PAPER_NUM_SAMPLES = 50_000
FEATURES_VERSION = "adm-inception-v1"
STAT_SHAPES = {"mu": (2048,), "sigma": (2048, 2048), "mu_s": (2023,), "sigma_s": (2023, 2023)}

__all__ = [
    "NpzImages",
    "Activations",
    "open_images",
    "compute_activations",
    "load_activations",
    "evaluate",
    "add_arguments",
    "run",
]


# ----------------------------------------------------------------------------------------------
# Reading .npz batches
# ----------------------------------------------------------------------------------------------


def _read_exact(f, size: int, what: str) -> bytes:
    chunks, got = [], 0
    while got < size:
        chunk = f.read(size - got)
        if not chunk:
            raise ValueError(f"{what}: file ended after {got} of {size} bytes -- the .npz is truncated; regenerate it")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _read_npy_header(f):
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    return None  # other versions: fall back to np.load


class NpzImages:
    """One array (``arr_0`` by default) of an ``.npz`` archive, read in batches without loading it.

    Uncompressed archives (``np.savez``) are memory-mapped; compressed ones (``np.savez_compressed``)
    are decompressed as a stream; anything else (Fortran order, unknown header versions) is loaded.
    Other, small arrays of the archive (``arr_1``, ``mu``, ...) are available through :meth:`load`.
    """

    def __init__(self, path: str, key: str = "arr_0"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file; pass the path of an .npz batch")
        self.path = path
        self.key = key
        try:
            with zipfile.ZipFile(path) as zf:
                self.names = sorted(n[:-4] for n in zf.namelist() if n.endswith(".npy"))
                member = f"{key}.npy"
                self._info = zf.getinfo(member) if member in zf.namelist() else None
        except zipfile.BadZipFile as err:
            raise ValueError(
                f"{path} is not an .npz archive ({err}); save batches with np.savez(path, arr_0=images)"
            ) from err
        self.shape = self.dtype = None
        self._mmap_offset = None
        self._in_memory = False  # Fortran order / object dtype / unknown header: load the whole array
        if self._info is None:
            return
        with zipfile.ZipFile(path) as zf, zf.open(self._info) as f:
            header = _read_npy_header(f)
        if header is None:
            arr = self.load(key)
            self.shape, self.dtype, self._in_memory = arr.shape, arr.dtype, True
            return
        self.shape, fortran, self.dtype = tuple(header[0]), header[1], header[2]
        self._in_memory = fortran or self.dtype.hasobject
        if self._info.compress_type == zipfile.ZIP_STORED and not self._in_memory:
            with open(path, "rb") as raw:
                raw.seek(self._info.header_offset)
                local = _read_exact(raw, 30, path)
                if local[:4] != b"PK\x03\x04":
                    return
                name_len = int.from_bytes(local[26:28], "little")
                extra_len = int.from_bytes(local[28:30], "little")
                raw.seek(self._info.header_offset + 30 + name_len + extra_len)
                if _read_npy_header(raw) is not None:
                    self._mmap_offset = raw.tell()

    @property
    def present(self) -> bool:
        return self._info is not None

    @property
    def memory_mapped(self) -> bool:
        return self._mmap_offset is not None

    def __len__(self) -> int:
        return int(self.shape[0])

    def load(self, name: str) -> np.ndarray:
        """Load a whole array of the archive (for the small ones: labels, stored statistics)."""
        with np.load(self.path) as data:
            if name not in data.files:
                raise ValueError(f"{self.path}: no array {name!r} (arrays: {data.files})")
            return data[name]

    def batches(self, batch_size: int, limit: int | None = None):
        """Yield consecutive batches of the array (the last may be shorter)."""
        if not self.present:
            raise ValueError(f"{self.path}: no array {self.key!r} (arrays: {self.names})")
        n = len(self) if limit is None else min(limit, len(self))
        if self.memory_mapped:
            arr = np.memmap(self.path, dtype=self.dtype, mode="r", offset=self._mmap_offset, shape=self.shape)
            for i in range(0, n, batch_size):
                yield np.asarray(arr[i : min(i + batch_size, n)])
            del arr
        elif self._in_memory:
            arr = self.load(self.key)
            for i in range(0, n, batch_size):
                yield np.ascontiguousarray(arr[i : min(i + batch_size, n)])
        else:
            row = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
            with zipfile.ZipFile(self.path) as zf, zf.open(self._info) as f:
                _read_npy_header(f)
                for i in range(0, n, batch_size):
                    bs = min(batch_size, n - i)
                    data = _read_exact(f, bs * row, f"{self.path}:{self.key}")
                    yield np.frombuffer(data, dtype=self.dtype).reshape((bs, *self.shape[1:]))


def _range_hint(reader: NpzImages) -> str:
    first = next(reader.batches(256, limit=256))
    lo, hi = float(np.min(first)), float(np.max(first))
    span = f"values span [{lo:g}, {hi:g}]"
    if np.issubdtype(reader.dtype, np.floating):
        if lo >= -1.0 and hi <= 1.0 and lo < 0:
            return f"{span}, i.e. [-1, 1]: convert with ((x + 1) * 127.5).clip(0, 255).astype(np.uint8)"
        if lo >= 0 and hi <= 1.0:
            return f"{span}, i.e. [0, 1]: convert with (x * 255).round().clip(0, 255).astype(np.uint8)"
        if lo >= 0 and hi <= 255:
            return f"{span}: convert with x.round().astype(np.uint8)"
        return f"{span}, outside any image range: check how the samples were produced"
    if lo >= 0 and hi <= 255:
        return f"{span}: convert with x.astype(np.uint8)"
    return f"{span}, outside [0, 255]: these are not 8-bit images"


def open_images(path: str, role: str = "sample", require: bool = True) -> NpzImages:
    """Open ``arr_0`` of an ``.npz`` batch and check it holds uint8 NHWC RGB images.

    Raises ``ValueError`` naming the problem and the fix for a missing ``arr_0`` (when ``require``),
    a wrong dtype or value range, NCHW / grayscale layouts and empty batches."""
    reader = NpzImages(path)
    if not reader.present:
        if require:
            raise ValueError(
                f"{role} batch {path}: no 'arr_0' array (arrays: {reader.names}); save images with "
                "np.savez(path, arr_0=images) where images is uint8 (N, H, W, 3)"
            )
        return reader
    shape = reader.shape
    if len(shape) != 4:
        raise ValueError(
            f"{role} batch {path}: arr_0 has shape {shape}; expected a batch of RGB images (N, H, W, 3)"
            + ("; add a channel axis and repeat it 3 times for grayscale" if len(shape) == 3 else "")
        )
    if shape[-1] != 3:
        if shape[1] == 3:
            fix = "it looks like NCHW: transpose with x.transpose(0, 2, 3, 1)"
        elif shape[-1] in (1, 4):
            fix = "convert to RGB (repeat a gray channel 3 times, drop alpha)"
        else:
            fix = "save images as (N, H, W, 3)"
        raise ValueError(f"{role} batch {path}: arr_0 has shape {shape}, not (N, H, W, 3) NHWC RGB; {fix}")
    if shape[0] == 0:
        raise ValueError(f"{role} batch {path}: arr_0 holds no images")
    if reader.dtype != np.uint8:
        raise ValueError(
            f"{role} batch {path}: arr_0 has dtype {reader.dtype}; the evaluator needs uint8 images in [0, 255] "
            f"(the original's format); {_range_hint(reader)}"
        )
    return reader


def _stored_statistics(reader: NpzImages, role: str):
    """Stored (mu, sigma) and (mu_s, sigma_s) of a batch, each None when absent; shapes checked."""
    out = []
    for mu_key, sigma_key in (("mu", "sigma"), ("mu_s", "sigma_s")):
        if mu_key in reader.names and sigma_key in reader.names:
            mu, sigma = reader.load(mu_key), reader.load(sigma_key)
            for key, arr in ((mu_key, mu), (sigma_key, sigma)):
                if arr.shape != STAT_SHAPES[key]:
                    raise ValueError(
                        f"{role} batch {reader.path}: stored {key} has shape {arr.shape}, expected "
                        f"{STAT_SHAPES[key]} (ADM Inception features); remove it or recompute it with this evaluator"
                    )
            out.append(metrics.FeatureStatistics(mu.astype(np.float64), sigma.astype(np.float64)))
        elif mu_key in reader.names or sigma_key in reader.names:
            raise ValueError(
                f"{role} batch {reader.path}: has only one of {mu_key}/{sigma_key}; store both or neither"
            )
        else:
            out.append(None)
    return tuple(out)


# ----------------------------------------------------------------------------------------------
# Activations and their cache
# ----------------------------------------------------------------------------------------------


@dataclass
class Activations:
    """Inception features of a batch: pool (N, 2048), spatial (N, 2023), logits (N, 1008), float32."""

    pool: np.ndarray
    spatial: np.ndarray
    logits: np.ndarray

    def probs(self) -> np.ndarray:
        """Softmax of the unbiased logits, float64 (the input of the Inception Score)."""
        z = self.logits.astype(np.float64)
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)


def default_cache_dir() -> str:
    env = os.environ.get("GUIDED_PIPELINES_CACHE")
    if env:
        return os.path.join(env, "activations")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "guided_pipelines", "activations")


def cache_path(cache_dir: str, npz_path: str, weights_id: str) -> str:
    """``<cache_dir>/<name>-<key>.features.npz``; key = SHA-256 of the file's real path, size and
    mtime, the weights' identity and the feature code version."""
    st = os.stat(npz_path)
    real = os.path.realpath(npz_path)
    key = json.dumps([real, st.st_size, st.st_mtime_ns, weights_id, FEATURES_VERSION])
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    stem = os.path.basename(npz_path)
    stem = stem[:-4] if stem.endswith(".npz") else stem
    return os.path.join(cache_dir, f"{stem}-{digest}.features.npz")


def compute_activations(reader: NpzImages, extractor, batch_size: int = 64, device=None, desc: str = "") -> Activations:
    """Run every image of ``reader`` through :class:`~guided_pipelines.inception.ADMInception`."""
    from tqdm.auto import tqdm

    with tqdm(total=len(reader), desc=desc or os.path.basename(reader.path), unit="img", file=sys.stderr) as bar:
        feats = extractor.extract(reader.batches(batch_size), device=device, progress=bar)
    return Activations(feats.pool, feats.spatial, feats.logits)


def load_activations(
    reader: NpzImages, extractor, weights_id: str, cache_dir: str | None, batch_size: int = 64, device=None, log=None
) -> Activations:
    """Activations of a batch, from the cache when present, else computed and cached atomically."""
    path = cache_path(cache_dir, reader.path, weights_id) if cache_dir else None
    if path and os.path.isfile(path):
        try:
            with np.load(path) as data:
                acts = Activations(data["pool"], data["spatial"], data["logits"])
            if len(acts.pool) == len(reader):
                if log:
                    log(f"using cached activations {path}")
                return acts
        except (OSError, KeyError, ValueError, zipfile.BadZipFile):
            pass  # unreadable cache: recompute
    acts = compute_activations(reader, extractor(), batch_size, device)
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp.npz"
        np.savez(tmp, pool=acts.pool, spatial=acts.spatial, logits=acts.logits)
        os.replace(tmp, path)
    return acts


# ----------------------------------------------------------------------------------------------
# The evaluation
# ----------------------------------------------------------------------------------------------


def evaluate(
    ref_batch: str,
    sample_batch: str,
    inception_weights: str | None = None,
    batch_size: int = 64,
    device: str | None = None,
    cache_dir: str | None = None,
    pr_mode: str = "adm",
    fid_method: str = "sqrtm",
    is_split_size: int = 5000,
    infinity_points: int = 15,
    bootstrap: int = 0,
    allow_resolution_mismatch: bool = False,
    log=print,
) -> dict:
    """Compute the evaluator's metrics for ``sample_batch`` against ``ref_batch``; returns a dict.

    Keys: ``inception_score``, ``fid``, ``sfid``, ``precision``, ``recall`` (the original's five
    numbers; precision / recall are None for a reference without images), ``num_samples``,
    ``num_reference``, ``fid_infinity``, ``is_infinity`` (None when disabled), ``fid_bootstrap``
    (when requested) and the inputs. ``log`` receives progress lines."""
    import torch

    ref = open_images(ref_batch, "reference", require=False)
    sample = open_images(sample_batch, "sample")
    ref_pool_stats, ref_spatial_stats = _stored_statistics(ref, "reference")
    if not ref.present and ref_pool_stats is None:
        raise ValueError(
            f"reference batch {ref_batch}: neither images (arr_0) nor statistics (mu, sigma); "
            "use one of the released reference batches"
        )
    if ref.present and ref.shape[1:3] != sample.shape[1:3] and not allow_resolution_mismatch:
        raise ValueError(
            f"reference images are {ref.shape[1]}x{ref.shape[2]} but samples are {sample.shape[1]}x{sample.shape[2]}; "
            "the paper compares each resolution with its own reference batch (e.g. VIRTUAL_imagenet128_labeled.npz "
            "for 128x128) -- use the matching one, or pass --allow-resolution-mismatch to compare anyway"
        )
    if pr_mode not in metrics.DISTANCE_MODES:
        raise ValueError(f"unknown precision/recall mode {pr_mode!r}; choose one of {metrics.DISTANCE_MODES}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")

    from guided_pipelines.inception import ADMInception, weights_identity

    weights_id = weights_identity(inception_weights)
    net = []

    def extractor():
        if not net:
            net.append(ADMInception(inception_weights).to(device))
        return net[0]

    log("computing reference batch activations..." if ref.present else "reference batch has statistics only")
    ref_acts = (
        load_activations(ref, extractor, weights_id, cache_dir, batch_size, device, log) if ref.present else None
    )
    log("computing sample batch activations...")
    sample_acts = load_activations(sample, extractor, weights_id, cache_dir, batch_size, device, log)
    if ref_pool_stats is None:
        ref_pool_stats = metrics.compute_statistics(ref_acts.pool)
    if ref_spatial_stats is None and ref_acts is not None:
        ref_spatial_stats = metrics.compute_statistics(ref_acts.spatial)
    sample_pool_stats, sample_spatial_stats = _stored_statistics(sample, "sample")

    def fid(acts, stored, ref_stats):
        if stored is not None:
            return metrics.frechet_distance(stored.mu, stored.sigma, ref_stats.mu, ref_stats.sigma, method=fid_method)
        return metrics.fid_against_statistics(acts, ref_stats.mu, ref_stats.sigma, method=fid_method)

    log("computing evaluations...")
    n = len(sample)
    probs = sample_acts.probs()
    result = {
        "inception_score": metrics.inception_score(probs, split_size=is_split_size),
        "fid": fid(sample_acts.pool, sample_pool_stats, ref_pool_stats),
        "sfid": None,
        "precision": None,
        "recall": None,
        "num_samples": n,
        "num_reference": len(ref) if ref.present else None,
        "fid_infinity": None,
        "is_infinity": None,
    }
    if ref_spatial_stats is not None:
        result["sfid"] = fid(sample_acts.spatial, sample_spatial_stats, ref_spatial_stats)
    if ref_acts is not None:
        pr = metrics.precision_recall(ref_acts.pool, sample_acts.pool, k=3, mode=pr_mode, device=device)
        result["precision"], result["recall"] = pr.precision, pr.recall
    if infinity_points and n >= 4:
        ext = metrics.fid_infinity(sample_acts.pool, ref_pool_stats.mu, ref_pool_stats.sigma, num_points=infinity_points)
        result["fid_infinity"] = ext.value
        result["fid_infinity_fit"] = {"slope": ext.slope, "sizes": ext.sizes.tolist(), "fids": ext.scores.tolist()}
        ext = metrics.is_infinity(probs, num_points=infinity_points)
        result["is_infinity"] = ext.value
        result["is_infinity_fit"] = {"slope": ext.slope, "sizes": ext.sizes.tolist(), "scores": ext.scores.tolist()}
    if bootstrap:
        bs = metrics.fid_bootstrap(sample_acts.pool, ref_pool_stats.mu, ref_pool_stats.sigma, num_bootstrap=bootstrap)
        result["fid_bootstrap"] = {"low": bs.low, "high": bs.high, "confidence": bs.confidence, "replicates": bootstrap}
    result.update(
        ref_batch=os.path.abspath(ref_batch),
        sample_batch=os.path.abspath(sample_batch),
        inception_weights=weights_id,
        precision_recall_mode=pr_mode,
        fid_method=fid_method,
        is_split_size=is_split_size,
    )
    return result


def format_report(result: dict) -> str:
    """The original's five lines (``Inception Score: ...`` etc.) followed by N and FID_inf / IS_inf."""
    def num(x):
        return "n/a (reference batch has no images)" if x is None else repr(float(x))

    lines = [
        f"Inception Score: {num(result['inception_score'])}",
        f"FID: {num(result['fid'])}",
        f"sFID: {'n/a (no spatial statistics)' if result['sfid'] is None else repr(float(result['sfid']))}",
        f"Precision: {num(result['precision'])}",
        f"Recall: {num(result['recall'])}",
        f"N: {result['num_samples']} samples"
        + (f", {result['num_reference']} reference images" if result["num_reference"] else ""),
    ]
    if result.get("fid_infinity") is not None:
        lines.append(f"FID_inf: {result['fid_infinity']!r} (Chong & Forsyth 2020, extrapolated to N = infinity)")
        lines.append(f"IS_inf: {result['is_infinity']!r}")
    if "fid_bootstrap" in result:
        b = result["fid_bootstrap"]
        lines.append(f"FID {100 * b['confidence']:g}% bootstrap interval: [{b['low']!r}, {b['high']!r}]")
    return "\n".join(lines)


def small_n_warning(result: dict) -> str | None:
    n = result["num_samples"]
    if n >= PAPER_NUM_SAMPLES:
        return None
    msg = (
        f"warning: {n} samples < {PAPER_NUM_SAMPLES:,} -- the paper's FID / sFID / IS use 50,000 samples. "
        "FID is biased upward at small N (FID_N ~ FID_inf + c / N), so this FID is not comparable with the "
        "paper's; compare FID_inf, or generate 50,000 samples."
    )
    fit = result.get("fid_infinity_fit")
    if fit:
        gap = fit["slope"] * (1 / n - 1 / PAPER_NUM_SAMPLES)
        msg += (
            f" Here the fitted line FID_N = FID_inf + {fit['slope']:.4g} / N puts FID at N = {n} "
            f"{gap:+.3g} from its value at N = 50,000."
        )
    return msg


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ref_batch", help="reference batch .npz (arr_0 uint8 NHWC images; optional mu/sigma/mu_s/sigma_s)")
    parser.add_argument("sample_batch", help="sample batch .npz (arr_0 uint8 NHWC images, as the sampling scripts write)")
    parser.add_argument(
        "--inception-weights",
        metavar="PATH",
        default=None,
        help="local torch-fidelity Inception weights (weights-inception-2015-12-05-6726825d.pth); default: download",
    )
    parser.add_argument("--json", metavar="OUT", default=None, help="also write the results to this JSON file")
    parser.add_argument("--batch-size", type=int, default=64, help="images per Inception batch (default 64, as the original)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--cache-dir", default=None, help=f"activation cache folder (default {default_cache_dir()})")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write cached activations")
    parser.add_argument(
        "--pr-mode",
        choices=metrics.DISTANCE_MODES,
        default="adm",
        help="precision/recall distances: 'adm' = the original's float16 (default), or exact float32/float64",
    )
    parser.add_argument(
        "--fid-method",
        choices=("sqrtm", "eigh"),
        default="sqrtm",
        help="'sqrtm' = the original's scipy.linalg.sqrtm (default); 'eigh' = same value via eigenvalues, faster",
    )
    parser.add_argument("--is-split-size", type=int, default=5000, help="Inception Score split size (default 5000)")
    parser.add_argument(
        "--infinity-points",
        type=int,
        default=15,
        help="subset sizes for FID_inf / IS_inf (default 15, Chong & Forsyth); 0 disables them",
    )
    parser.add_argument("--bootstrap", type=int, default=0, metavar="B", help="B bootstrap replicates for a 95%% FID interval")
    parser.add_argument(
        "--allow-resolution-mismatch",
        action="store_true",
        help="compare samples with a reference batch of another resolution",
    )


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    cache_dir = None if args.no_cache else (args.cache_dir or default_cache_dir())

    def log(msg):
        print(msg, file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        result = evaluate(
            args.ref_batch,
            args.sample_batch,
            inception_weights=args.inception_weights,
            batch_size=args.batch_size,
            device=args.device,
            cache_dir=cache_dir,
            pr_mode=args.pr_mode,
            fid_method=args.fid_method,
            is_split_size=args.is_split_size,
            infinity_points=args.infinity_points,
            bootstrap=args.bootstrap,
            allow_resolution_mismatch=args.allow_resolution_mismatch,
            log=log,
        )
    print(format_report(result))
    warning = small_n_warning(result)
    if warning:
        print(warning, file=sys.stderr)
    if args.json:
        tmp = f"{args.json}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2)
        os.replace(tmp, args.json)
    return 0
