"""The ADM evaluator's metrics (Dhariwal & Nichol 2021, appendix "Evaluation metrics") on features.

Everything here works on Inception features that are already computed (see
``guided_pipelines.inception`` for the network) and reproduces the numbers of the original
TensorFlow evaluator (``evaluations/evaluator.py`` of openai/guided-diffusion):

* :func:`frechet_distance` / :func:`fid_from_features` -- FID (Heusel et al. 2017, eq. 6) on pool
  features and sFID (Nash et al. 2021) on the first 7 spatial channels of ``mixed_6/conv``;
* :func:`inception_score` -- IS (Salimans et al. 2016), ``exp E_x KL(p(y|x) || p(y))``, averaged over
  sequential splits of 5000 samples like the original;
* :func:`precision_recall` -- improved precision / recall (Kynkaanniemi et al. 2019, eq. 1-3) with
  the original's k-NN manifold estimate (k = 3) and its float16 squared distances;
* :func:`fid_infinity` / :func:`is_infinity` -- Chong & Forsyth 2020, the effectively unbiased
  FID_inf / IS_inf extrapolated from 15 subset sizes;
* :func:`fid_bootstrap` -- a bootstrap confidence interval for FID.

Statistics are float64. This module imports numpy, scipy and torch only (no torchvision, no
diffusers), so training scripts and CI can import it cheaply. The torchmetrics ``Metric`` classes
(:class:`ADMFrechetInceptionDistance`, :class:`ADMSpatialFrechetInceptionDistance`) live with the
network in ``guided_pipelines.inception`` and are re-exported here lazily.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import NamedTuple

import numpy as np
import torch

__all__ = [
    "FeatureStatistics",
    "compute_statistics",
    "frechet_distance",
    "fid_from_features",
    "fid_against_statistics",
    "inception_score",
    "pairwise_squared_distances",
    "manifold_radii",
    "precision_recall",
    "PrecisionRecall",
    "Extrapolation",
    "fid_infinity",
    "is_infinity",
    "fid_bootstrap",
    "BootstrapInterval",
    "subset_sizes",
    "ADMFrechetInceptionDistance",
    "ADMSpatialFrechetInceptionDistance",
]

DISTANCE_MODES = ("adm", "float32", "float64")


# --------------------------------------------------------------------------------------------
# Fréchet distance
# --------------------------------------------------------------------------------------------


class FeatureStatistics(NamedTuple):
    """Mean ``mu`` (D,) and covariance ``sigma`` (D, D) of a feature set, float64."""

    mu: np.ndarray
    sigma: np.ndarray


def _as_2d_features(features, name: str) -> np.ndarray:
    arr = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    if arr.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D array (num_samples, feature_dim), got shape {arr.shape}; "
            "flatten per-sample features first, e.g. features.reshape(len(features), -1)"
        )
    if arr.shape[0] < 2:
        raise ValueError(f"{name} holds {arr.shape[0]} sample(s); a covariance needs at least 2 -- pass more samples")
    return arr


def compute_statistics(features) -> FeatureStatistics:
    """Mean and unbiased covariance (``np.cov``, divisor N - 1) of ``features`` (N, D), in float64."""
    arr = _as_2d_features(features, "features").astype(np.float64, copy=False)
    return FeatureStatistics(arr.mean(axis=0), np.cov(arr, rowvar=False))


def _trace_sqrt_product_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    """``Tr sqrtm(sigma1 @ sigma2)`` exactly as the original evaluator (TTUR's ``fid.py``) does it."""
    from scipy import linalg

    with warnings.catch_warnings():
        # scipy may warn about an ill-conditioned product; the finiteness check below handles it.
        warnings.simplefilter("ignore", RuntimeWarning)
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(
            f"FID: the product of the covariances is singular; adding {eps} to their diagonals "
            "(as the original evaluator does)",
            RuntimeWarning,
            stacklevel=3,
        )
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                f"FID: sqrtm(sigma1 @ sigma2) has an imaginary component of "
                f"{np.max(np.abs(covmean.imag)):.3g}; the covariances are not positive semi-definite -- "
                "check the features for NaN/inf or use more samples than feature dimensions"
            )
        covmean = covmean.real
    return float(np.trace(covmean))


class _ReferenceTrace:
    """``Tr sqrtm(sigma_ref @ S)`` for many sample covariances ``S`` against one reference.

    Uses ``Tr sqrtm(A S) = sum_i sqrt(lambda_i)`` over the eigenvalues of a symmetric matrix with
    the same non-zero spectrum as ``A S``: ``A^1/2 S A^1/2`` (D x D) when the sample is full rank,
    or ``Xc A Xc^T / (n - 1)`` (n x n, Xc the centred samples) when n <= D -- exact for PSD
    covariances and far faster than ``sqrtm`` (which also handles the rank-deficient n < D case
    poorly)."""

    def __init__(self, sigma_ref: np.ndarray):
        self.sigma_ref = sigma_ref
        self._sqrt = None

    @property
    def sqrt_ref(self) -> np.ndarray:
        if self._sqrt is None:
            vals, vecs = np.linalg.eigh((self.sigma_ref + self.sigma_ref.T) / 2)
            self._sqrt = (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T
        return self._sqrt

    def of_features(self, x: np.ndarray) -> tuple[float, FeatureStatistics]:
        """(trace, statistics of ``x``) for a float64 feature matrix ``x`` (n, D)."""
        n, dim = x.shape
        mu = x.mean(axis=0)
        xc = x - mu
        sigma = xc.T @ xc / (n - 1)
        if n <= dim:
            small = xc @ self.sigma_ref @ xc.T / (n - 1)
            trace = _sum_sqrt_eigvals(small)
        else:
            trace = self.of_covariance(sigma)
        return trace, FeatureStatistics(mu, sigma)

    def of_covariance(self, sigma: np.ndarray) -> float:
        return _sum_sqrt_eigvals(self.sqrt_ref @ sigma @ self.sqrt_ref)


def _sum_sqrt_eigvals(sym: np.ndarray) -> float:
    eigvals = np.linalg.eigvalsh((sym + sym.T) / 2)
    return float(np.sqrt(np.clip(eigvals, 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, method: str = "sqrtm") -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017, eq. 6).

    ``d^2 = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))``, computed in float64.

    ``method="sqrtm"`` follows the original evaluator: ``scipy.linalg.sqrtm`` of the product; if
    that is not finite, ``eps`` is added to both diagonals and it is retried; an imaginary part
    larger than 1e-3 on the diagonal raises ``ValueError``, a smaller one is dropped.
    ``method="eigh"`` takes the trace from symmetric eigenvalues instead (same value for PSD
    covariances, much faster; used by :func:`fid_infinity` and :func:`fid_bootstrap`).
    """
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(
            f"FID: the mean vectors have different lengths {mu1.shape} and {mu2.shape}; both statistics "
            "must come from the same feature layer (2048 pool features for FID, 2023 spatial for sFID)"
        )
    if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError(
            f"FID: covariances of shapes {sigma1.shape} and {sigma2.shape} do not match the mean length "
            f"{mu1.shape[0]}; pass (mu, sigma) pairs from the same feature layer"
        )
    diff = mu1 - mu2
    if method == "sqrtm":
        tr_covmean = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps)
    elif method == "eigh":
        tr_covmean = _ReferenceTrace(sigma1).of_covariance(sigma2)
    else:
        raise ValueError(f"unknown method {method!r}; use 'sqrtm' (the original's) or 'eigh' (fast)")
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def fid_from_features(features_a, features_b, method: str = "sqrtm") -> float:
    """FID between two feature sets (N, D) and (M, D): :func:`frechet_distance` of their statistics."""
    b = compute_statistics(features_b)
    return fid_against_statistics(features_a, b.mu, b.sigma, method=method)


def fid_against_statistics(sample_features, ref_mu, ref_sigma, method: str = "sqrtm") -> float:
    """FID of sample features (N, D) against reference statistics (e.g. a reference batch's stored
    ``mu``/``sigma``). ``method="sqrtm"`` is the original's computation; ``method="eigh"`` is the
    same quantity from symmetric eigenvalues, taking an N x N route when N <= D (seconds instead of
    minutes for small N)."""
    if method == "sqrtm":
        s = compute_statistics(sample_features)
        return frechet_distance(s.mu, s.sigma, ref_mu, ref_sigma, method="sqrtm")
    if method != "eigh":
        raise ValueError(f"unknown method {method!r}; use 'sqrtm' (the original's) or 'eigh' (fast)")
    x = _as_2d_features(sample_features, "sample_features").astype(np.float64, copy=False)
    return _fid_eigh(x, np.asarray(ref_mu, np.float64), _ReferenceTrace(_check_sigma(ref_sigma, x.shape[1])))


def _check_sigma(sigma, dim: int) -> np.ndarray:
    sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if sigma.shape != (dim, dim):
        raise ValueError(
            f"reference covariance has shape {sigma.shape} but the features have dimension {dim}; "
            "use statistics of the same feature layer (mu/sigma for pool features, mu_s/sigma_s for spatial)"
        )
    return sigma


def _fid_eigh(x: np.ndarray, ref_mu: np.ndarray, ref: _ReferenceTrace) -> float:
    if ref_mu.shape != (x.shape[1],):
        raise ValueError(f"reference mean has shape {ref_mu.shape}, features have dimension {x.shape[1]}")
    trace, stats = ref.of_features(x)
    diff = stats.mu - ref_mu
    return float(diff.dot(diff) + np.trace(stats.sigma) + np.trace(ref.sigma_ref) - 2 * trace)


# --------------------------------------------------------------------------------------------
# Inception Score
# --------------------------------------------------------------------------------------------


def _check_probs(probs) -> np.ndarray:
    p = probs.detach().cpu().numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs)
    if p.ndim != 2:
        raise ValueError(f"probs must be (num_samples, num_classes) class probabilities, got shape {p.shape}")
    p = p.astype(np.float64, copy=False)
    if p.size and (p.min() < 0 or not np.allclose(p.sum(axis=1), 1.0, atol=1e-3)):
        raise ValueError(
            "probs must be softmax probabilities (non-negative rows summing to 1); "
            "if you have logits, pass scipy.special.softmax(logits, axis=1)"
        )
    return p


def _inception_score_single(part: np.ndarray) -> float:
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = part * (np.log(part) - np.log(part.mean(axis=0, keepdims=True)))
    kl = np.nan_to_num(kl, nan=0.0)  # 0 * log 0 = 0
    return float(np.exp(kl.sum(axis=1).mean()))


def inception_score(probs, split_size: int = 5000) -> float:
    """Inception Score ``exp(E_x KL(p(y|x) || p(y)))`` (Salimans et al. 2016), float64.

    As the original evaluator: the probabilities are cut into *sequential* splits of
    ``split_size`` rows (the last may be shorter), each split's ``p(y)`` is its own mean, and the
    result is the mean of the per-split scores (50k samples -> 10 splits of 5000)."""
    p = _check_probs(probs)
    if split_size < 1:
        raise ValueError(f"split_size must be >= 1, got {split_size}")
    scores = [_inception_score_single(p[i : i + split_size]) for i in range(0, len(p), split_size)]
    return float(np.mean(scores))


# --------------------------------------------------------------------------------------------
# Precision / recall (Kynkaanniemi et al. 2019) with the original's float16 distances
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def full_float32_precision():
    """Disable TF32 for CUDA matmuls and cuDNN convolutions inside the block (restored after)."""
    saved = []
    matmul = getattr(torch.backends.cuda, "matmul", None)
    conv = getattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision", None)
    try:
        if matmul is not None and hasattr(matmul, "fp32_precision"):
            saved.append((matmul, "fp32_precision", matmul.fp32_precision))
            matmul.fp32_precision = "ieee"
        else:  # older torch
            saved.append((matmul, "allow_tf32", matmul.allow_tf32))
            matmul.allow_tf32 = False
        if conv is not None:
            saved.append((torch.backends.cudnn.conv, "fp32_precision", conv))
            torch.backends.cudnn.conv.fp32_precision = "ieee"
        else:
            saved.append((torch.backends.cudnn, "allow_tf32", torch.backends.cudnn.allow_tf32))
            torch.backends.cudnn.allow_tf32 = False
        yield
    finally:
        for obj, attr, value in reversed(saved):
            setattr(obj, attr, value)


def _to_fp16(x: torch.Tensor) -> torch.Tensor:
    """Round float32 values to float16 and back (IEEE round-to-nearest-even, overflow -> inf)."""
    return x.half().float()


def pairwise_squared_distances(u: torch.Tensor, v: torch.Tensor, mode: str = "adm") -> torch.Tensor:
    """Squared Euclidean distances ``max(|u|^2 - 2 u.v + |v|^2, 0)`` between rows, as float32 (n, m).

    ``mode="adm"`` reproduces the original ``DistanceBlock``: inputs, squares, norms, the matrix
    product, ``2 u.v`` and both sums are rounded to float16 (float16 +, -, * are computed in float32
    and rounded, which equals IEEE float16 arithmetic; the sums and the matrix product accumulate
    in float32, since TensorFlow's accumulation order cannot be reproduced). If any distance of the
    block is not finite (float16 overflow above 65504), the whole block is recomputed in float32, as
    the original does. ``mode="float32"`` is that float32 formula; ``mode="float64"`` is exact to
    float64 rounding."""
    return _distances(u, v, mode).float()


def _distances(u: torch.Tensor, v: torch.Tensor, mode: str) -> torch.Tensor:
    """:func:`pairwise_squared_distances`, but the float16 result of ``mode="adm"`` stays float16."""
    if mode not in DISTANCE_MODES:
        raise ValueError(f"unknown distance mode {mode!r}; choose one of {DISTANCE_MODES}")
    if mode == "float64":
        u, v = u.double(), v.double()
        d = (u * u).sum(1)[:, None] - 2 * (u @ v.T) + (v * v).sum(1)[None, :]
        return d.clamp_min_(0).float()
    u, v = u.float(), v.float()
    if mode == "adm":
        uh, vh = _to_fp16(u), _to_fp16(v)
        norm_u = _to_fp16(uh * uh).sum(1).half()
        norm_v = _to_fp16(vh * vh).sum(1).half()
        d = (uh @ vh.T).half()
        d.mul_(-2.0).add_(norm_u[:, None]).add_(norm_v[None, :]).clamp_min_(0)
        if bool(torch.isfinite(d).all()):
            return d
    d = u @ v.T
    d.mul_(-2.0).add_((u * u).sum(1)[:, None]).add_((v * v).sum(1)[None, :])
    return d.clamp_min_(0)


def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _as_feature_tensor(features, name: str) -> torch.Tensor:
    if isinstance(features, torch.Tensor):
        t = features.detach()
    else:
        t = torch.from_numpy(np.ascontiguousarray(features))
    if t.ndim != 2:
        raise ValueError(f"{name} must be (num_samples, feature_dim), got shape {tuple(t.shape)}")
    return t.float().cpu()


def manifold_radii(
    features,
    k: int = 3,
    mode: str = "adm",
    device=None,
    row_batch_size: int = 10000,
    col_batch_size: int = 10000,
) -> np.ndarray:
    """k-NN radii of the feature manifold (Kynkaanniemi et al. 2019, eq. 1): float32 (N,).

    radius_i = squared distance from feature i to its k-th nearest neighbour, counting i itself
    as the 0-th (the original's ``np.partition(..., k)[:, k]``); squared distances come from
    :func:`pairwise_squared_distances` with ``mode``. Memory is O(row_batch_size * col_batch_size):
    the k+1 smallest distances of each row are merged block by block."""
    feats = _as_feature_tensor(features, "features")
    n = feats.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k = {k} nearest neighbours need more than k features; got {n} -- pass more samples or lower k")
    dev = _resolve_device(device)
    radii = torch.empty(n, dtype=torch.float32)
    with full_float32_precision(), torch.no_grad():
        for r0 in range(0, n, row_batch_size):
            rows = feats[r0 : r0 + row_batch_size].to(dev)
            best = None
            for c0 in range(0, n, col_batch_size):
                cols = rows if (c0 == r0 and col_batch_size == row_batch_size) else feats[c0 : c0 + col_batch_size].to(dev)
                d = _distances(rows, cols, mode)
                kk = min(k + 1, d.shape[1])
                block_best = torch.topk(d, kk, dim=1, largest=False, sorted=False).values.float()
                best = block_best if best is None else torch.cat([best, block_best], dim=1)
                if best.shape[1] > k + 1:
                    best = torch.topk(best, k + 1, dim=1, largest=False, sorted=False).values
            radii[r0 : r0 + rows.shape[0]] = best.max(dim=1).values.cpu()
    return radii.numpy()


class PrecisionRecall(NamedTuple):
    """Result of :func:`precision_recall`; the radii are the squared k-NN distances (float32)."""

    precision: float
    recall: float
    radii_ref: np.ndarray
    radii_sample: np.ndarray


def precision_recall(
    ref_features,
    sample_features,
    k: int = 3,
    mode: str = "adm",
    device=None,
    row_batch_size: int = 10000,
    col_batch_size: int = 10000,
) -> PrecisionRecall:
    """Improved precision and recall (Kynkaanniemi et al. 2019, eq. 1-3), as the ADM evaluator.

    precision = fraction of samples inside the reference manifold, recall = fraction of references
    inside the sample manifold; a point is inside when its squared distance to some manifold
    point is <= (inclusive) that point's k-NN radius (:func:`manifold_radii`). Distances are
    computed block by block (10000 x 10000 by default, like the original; 10k x 50k fits in
    memory), on ``device`` (default: CUDA when available), TF32 off. ``mode="adm"`` rounds
    distances to float16 like the original (agrees with it to ~1e-3); ``"float32"`` and
    ``"float64"`` are exact-arithmetic variants."""
    ref = _as_feature_tensor(ref_features, "ref_features")
    sample = _as_feature_tensor(sample_features, "sample_features")
    if ref.shape[1] != sample.shape[1]:
        raise ValueError(
            f"reference features have dimension {ref.shape[1]} but sample features {sample.shape[1]}; "
            "use the same feature layer (2048 pool features) for both"
        )
    kw = dict(k=k, mode=mode, device=device, row_batch_size=row_batch_size, col_batch_size=col_batch_size)
    radii_ref = manifold_radii(ref, **kw)
    radii_sample = manifold_radii(sample, **kw)
    dev = _resolve_device(device)
    r_ref = torch.from_numpy(radii_ref)
    r_sample = torch.from_numpy(radii_sample)
    ref_in = torch.zeros(len(ref), dtype=torch.bool)  # reference point inside the sample manifold
    sample_in = torch.zeros(len(sample), dtype=torch.bool)  # sample inside the reference manifold
    with full_float32_precision(), torch.no_grad():
        for r0 in range(0, len(ref), row_batch_size):
            rows = ref[r0 : r0 + row_batch_size].to(dev)
            rr = r_ref[r0 : r0 + row_batch_size].to(dev)
            for c0 in range(0, len(sample), col_batch_size):
                cols = sample[c0 : c0 + col_batch_size].to(dev)
                rs = r_sample[c0 : c0 + col_batch_size].to(dev)
                d = _distances(rows, cols, mode)
                ref_in[r0 : r0 + len(rows)] |= (d <= rs[None, :]).any(dim=1).cpu()
                sample_in[c0 : c0 + len(cols)] |= (d <= rr[:, None]).any(dim=0).cpu()
    return PrecisionRecall(
        precision=float(sample_in.double().mean()),
        recall=float(ref_in.double().mean()),
        radii_ref=radii_ref,
        radii_sample=radii_sample,
    )


# --------------------------------------------------------------------------------------------
# FID_inf / IS_inf (Chong & Forsyth 2020) and a bootstrap interval
# --------------------------------------------------------------------------------------------


class Extrapolation(NamedTuple):
    """``value`` = intercept of the least-squares line ``score(N) = value + slope / N`` fitted to
    ``scores`` measured at ``sizes`` (Chong & Forsyth 2020, sec. 4)."""

    value: float
    slope: float
    sizes: np.ndarray
    scores: np.ndarray


def subset_sizes(num_samples: int, num_points: int = 15, min_size: int = 5000) -> np.ndarray:
    """Chong & Forsyth's subset sizes ``linspace(min_size, N, num_points)`` truncated to int.

    With fewer than ``2 * min_size`` samples the smallest size becomes ``N // 2`` so that the
    fit still spans a factor of two in N (the extrapolation is then less reliable)."""
    if num_samples < 4:
        raise ValueError(f"FID_inf / IS_inf need at least 4 samples, got {num_samples}")
    lo = min(min_size, num_samples // 2)
    sizes = np.linspace(lo, num_samples, num_points).astype(np.int64)
    return np.unique(sizes)


def _fit_intercept(sizes: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    slope, intercept = np.polyfit(1.0 / sizes.astype(np.float64), scores.astype(np.float64), 1)
    return float(intercept), float(slope)


def fid_infinity(
    sample_features,
    ref_mu,
    ref_sigma,
    num_points: int = 15,
    min_size: int = 5000,
    seed: int = 0,
) -> Extrapolation:
    """FID_inf (Chong & Forsyth 2020): FID_N is linear in 1/N, so fit FID at ``num_points`` subset
    sizes from ``min_size`` to N (a fresh random subset for each size) and take the intercept at
    1/N = 0. ``ref_mu``/``ref_sigma`` are the reference statistics (e.g. the stored ``mu``/``sigma``
    of a reference batch). Deterministic given ``seed``."""
    feats = _as_2d_features(sample_features, "sample_features").astype(np.float64, copy=False)
    ref = _ReferenceTrace(_check_sigma(ref_sigma, feats.shape[1]))
    ref_mu = np.asarray(ref_mu, dtype=np.float64)
    rng = np.random.default_rng(seed)
    sizes = subset_sizes(len(feats), num_points, min_size)
    scores = [_fid_eigh(feats[rng.permutation(len(feats))[:n]], ref_mu, ref) for n in sizes]
    scores = np.asarray(scores)
    value, slope = _fit_intercept(sizes, scores)
    return Extrapolation(value, slope, sizes, scores)


def is_infinity(probs, num_points: int = 15, min_size: int = 5000, seed: int = 0) -> Extrapolation:
    """IS_inf (Chong & Forsyth 2020): Inception Score (one split) of random subsets at
    ``num_points`` sizes from ``min_size`` to N, linearly extrapolated in 1/N to 1/N = 0."""
    p = _check_probs(probs)
    rng = np.random.default_rng(seed)
    sizes = subset_sizes(len(p), num_points, min_size)
    scores = np.asarray([_inception_score_single(p[rng.permutation(len(p))[:n]]) for n in sizes])
    value, slope = _fit_intercept(sizes, scores)
    return Extrapolation(value, slope, sizes, scores)


class BootstrapInterval(NamedTuple):
    """``fid`` on all samples, the re-centred bootstrap interval ``[low, high]`` and the raw
    bootstrap ``replicates``."""

    fid: float
    low: float
    high: float
    confidence: float
    replicates: np.ndarray


def fid_bootstrap(
    sample_features,
    ref_mu,
    ref_sigma,
    num_bootstrap: int = 100,
    confidence: float = 0.95,
    seed: int = 0,
) -> BootstrapInterval:
    """Bootstrap interval (Efron & Tibshirani 1993, ch. 13) of FID against fixed reference
    statistics, for the sampling noise of the N generated images.

    The N sample features are resampled with replacement ``num_bootstrap`` times. Resampling
    repeats points, which lowers the effective N and so raises FID (FID_N ~ FID_inf + c / N,
    Chong & Forsyth 2020), so the replicates are re-centred on the full-sample FID before taking
    their ``(1 -+ confidence) / 2`` quantiles: ``[fid + q_lo - mean, fid + q_hi - mean]``. The
    interval describes variability at this N; the 1/N bias itself is what :func:`fid_infinity`
    removes."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if num_bootstrap < 2:
        raise ValueError(f"num_bootstrap must be >= 2, got {num_bootstrap}")
    feats = _as_2d_features(sample_features, "sample_features").astype(np.float64, copy=False)
    ref = _ReferenceTrace(_check_sigma(ref_sigma, feats.shape[1]))
    ref_mu = np.asarray(ref_mu, dtype=np.float64)
    rng = np.random.default_rng(seed)
    reps = np.asarray(
        [_fid_eigh(feats[rng.integers(0, len(feats), len(feats))], ref_mu, ref) for _ in range(num_bootstrap)]
    )
    alpha = (1 - confidence) / 2
    q_low, q_high = np.quantile(reps, [alpha, 1 - alpha])
    fid = _fid_eigh(feats, ref_mu, ref)
    shift = fid - reps.mean()
    return BootstrapInterval(fid, float(q_low + shift), float(q_high + shift), confidence, reps)


def __getattr__(name):
    # The torchmetrics classes need torch-fidelity/torchmetrics (which import torchvision); load them
    # only on first use so that ``import guided_pipelines.metrics`` stays light.
    if name in ("ADMFrechetInceptionDistance", "ADMSpatialFrechetInceptionDistance"):
        from guided_pipelines import inception

        return getattr(inception, name)
    raise AttributeError(f"module 'guided_pipelines.metrics' has no attribute {name!r}")

