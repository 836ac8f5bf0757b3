"""The Inception-v3 network of the ADM evaluator, in PyTorch, and torchmetrics FID / sFID on it.

The original evaluator (openai/guided-diffusion ``evaluations/evaluator.py``) runs TensorFlow's
2015 ``classify_image_graph_def.pb`` on float32 NHWC images in [0, 255] and reads

* ``pool_3:0`` -- 2048 pool features, used for FID and precision / recall;
* ``mixed_6/conv:0`` -- the 1x1 branch of the 7th mixed block (torchvision / torch-fidelity name
  ``Mixed_6d.branch1x1``) after batch norm and ReLU, 17 x 17 x 768, of which the first 7 channels
  are kept and flattened in NHWC order: 17 * 17 * 7 = 2023 spatial features for sFID
  (Nash et al. 2021);
* ``softmax(pool_3 @ W)`` with the *unbiased* logits (no bias term) over 1008 classes for IS.

torch-fidelity's ``FeatureExtractorInceptionV3`` is a port of exactly that graph (weights converted
from it, TF1-style bilinear resize to 299 x 299 inside, ``(x - 128) / 128``), so
:class:`ADMInception` wraps it, captures ``Mixed_6d.branch1x1`` with a forward hook and flattens it
in the TensorFlow (NHWC) order, so the stored ``mu_s`` / ``sigma_s`` of the reference batches apply.
Everything runs in float32 with TF32 disabled.
"""

from __future__ import annotations

import hashlib
import os
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torchmetrics import Metric

from guided_pipelines.metrics import frechet_distance, full_float32_precision

INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
POOL_DIM = 2048
SPATIAL_CHANNELS = 7
SPATIAL_SIZE = 17
SPATIAL_DIM = SPATIAL_SIZE * SPATIAL_SIZE * SPATIAL_CHANNELS  # 2023
NUM_LOGITS = 1008

__all__ = [
    "ADMInception",
    "InceptionFeatures",
    "spatial_features_nhwc",
    "images_to_uint8_nchw",
    "make_random_inception_weights",
    "weights_identity",
    "ADMFrechetInceptionDistance",
    "ADMSpatialFrechetInceptionDistance",
]


class InceptionFeatures(NamedTuple):
    """Per-image features, float32: ``pool`` (N, 2048), ``spatial`` (N, 2023), ``logits`` (N, 1008)."""

    pool: np.ndarray
    spatial: np.ndarray
    logits: np.ndarray


def spatial_features_nhwc(mixed_6_conv: torch.Tensor) -> torch.Tensor:
    """(N, C, 17, 17) NCHW activations -> (N, 17 * 17 * 7): the first 7 channels flattened in NHWC
    order, i.e. feature index ``(h * 17 + w) * 7 + c`` as TensorFlow's ``reshape`` of
    ``mixed_6/conv[..., :7]`` produces."""
    if mixed_6_conv.ndim != 4 or mixed_6_conv.shape[1] < SPATIAL_CHANNELS:
        raise ValueError(f"expected (N, C >= 7, H, W) activations, got shape {tuple(mixed_6_conv.shape)}")
    x = mixed_6_conv[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1)
    return x.reshape(x.shape[0], -1)


def images_to_uint8_nchw(images) -> torch.Tensor:
    """Validate a batch of RGB images and return it as a uint8 (N, 3, H, W) tensor.

    Accepts uint8 numpy arrays / tensors in NHWC (the ``.npz`` batches' layout) or NCHW. Floating
    images are refused with the conversion to use: the evaluator's features depend on the exact
    uint8 values."""
    if isinstance(images, np.ndarray):
        images = np.array(images) if not images.flags.writeable else np.ascontiguousarray(images)
    t = torch.from_numpy(images) if isinstance(images, np.ndarray) else images
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"images must be a numpy array or torch tensor, got {type(images).__name__}")
    if t.dtype != torch.uint8:
        raise ValueError(
            f"images have dtype {t.dtype}; the evaluator needs uint8 RGB in [0, 255] -- convert samples in "
            "[-1, 1] with ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8), as the original sampling scripts do"
        )
    if t.ndim != 4:
        raise ValueError(f"images must be a batch (N, H, W, 3) or (N, 3, H, W), got shape {tuple(t.shape)}")
    if t.shape[-1] == 3 and t.shape[1] != 3:
        t = t.permute(0, 3, 1, 2)
    elif t.shape[1] != 3:
        raise ValueError(
            f"images must have 3 RGB channels (N, H, W, 3) or (N, 3, H, W), got shape {tuple(t.shape)}; "
            "repeat grayscale images to 3 channels first"
        )
    return t.contiguous()


def weights_identity(weights_path: str | None) -> str:
    """A string naming the Inception weights, for activation cache keys: the SHA-256 of a local
    weights file, or the download URL (whose file name carries torch-fidelity's hash)."""
    if weights_path is None:
        return INCEPTION_URL
    digest = hashlib.sha256()
    with open(weights_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def _fidelity_module():
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    return fe


def _build_extractor(weights_path: str | None):
    fe = _fidelity_module()
    if weights_path is not None and not os.path.isfile(weights_path):
        raise FileNotFoundError(
            f"Inception weights {weights_path!r} not found; download {INCEPTION_URL} and pass its path "
            "with --inception-weights"
        )
    try:
        return fe.FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=weights_path
        )
    except Exception as err:  # OSError/RuntimeError, or an unpickling error for a corrupt file
        if weights_path is None:
            raise FileNotFoundError(
                f"could not download the Inception weights from {INCEPTION_URL} ({err}); download the file "
                "on a machine with network access and pass it with --inception-weights PATH"
            ) from err
        raise ValueError(
            f"{weights_path!r} is not a torch-fidelity Inception-v3 state_dict ({err}); use {INCEPTION_URL}"
        ) from err


class ADMInception(nn.Module):
    """The ADM evaluator's Inception-v3: pool, spatial (sFID) and unbiased-logit features.

    ``weights_path``: a local copy of torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``
    (or any state_dict of the same architecture); ``None`` downloads it from :data:`INCEPTION_URL`.
    """

    def __init__(self, weights_path: str | None = None):
        super().__init__()
        self.net = _build_extractor(weights_path)
        self._spatial = None
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._capture_spatial)

    def _capture_spatial(self, module, inputs, output):
        self._spatial = spatial_features_nhwc(output)

    @torch.no_grad()
    def forward(self, images) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """uint8 images (N, H, W, 3) or (N, 3, H, W) -> (pool, spatial, logits) float32 tensors."""
        x = images_to_uint8_nchw(images).to(self.net.fc.weight.device)
        with full_float32_precision():
            pool, logits = self.net(x)
        spatial, self._spatial = self._spatial, None
        return pool, spatial, logits

    def extract(self, batches, device=None, progress=None) -> InceptionFeatures:
        """Run an iterable of uint8 image batches through the network; returns numpy features."""
        if device is not None:
            self.to(device)
        pools, spatials, logits = [], [], []
        for batch in batches:
            p, s, lg = self(batch)
            pools.append(p.cpu().numpy())
            spatials.append(s.cpu().numpy())
            logits.append(lg.cpu().numpy())
            if progress is not None:
                progress.update(len(p))
        if not pools:
            raise ValueError("no images to extract features from")
        return InceptionFeatures(np.concatenate(pools), np.concatenate(spatials), np.concatenate(logits))


def make_random_inception_weights(path: str, seed: int = 0, calibration_size: int = 8, image_size: int = 32) -> str:
    """Save a randomly initialised Inception-v3 state_dict, loadable like torch-fidelity's weights.

    For tests without the 91 MB download: convolutions keep PyTorch's default initialisation, the
    batch-norm statistics are set from one forward pass of random ``image_size`` images, noise and
    blocky patterns (so activations of such images stay O(1) through all 94 layers, as with the real
    weights; very different inputs can still blow up a random network), and the classifier is
    scaled so that its logits have standard deviation 3 (a non-uniform softmax, finite IS)."""
    fe = _fidelity_module()

    class _Unloaded(fe.FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, *args, **kwargs):  # skip the weights download
            return None

    original = fe.load_state_dict_from_url
    fe.load_state_dict_from_url = lambda *args, **kwargs: {}
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = _Unloaded("inception-v3-random", ["2048", "logits_unbiased"])
            for module in net.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.reset_running_stats()
                    module.momentum = None  # cumulative average: one batch -> that batch's statistics
                    module.weight.data.uniform_(0.5, 1.0)
                    module.bias.data.uniform_(-0.5, 0.1)
            net.train()
            # Calibration images: half pure noise, half blocky patterns with noise (smooth content).
            noise = torch.randint(0, 256, (calibration_size, 3, image_size, image_size)).float()
            blocks = torch.randint(0, 256, (calibration_size, 3, 4, 4)).float()
            blocks = nn.functional.interpolate(blocks, size=(image_size, image_size), mode="nearest")
            smooth = blocks + 30 * torch.randn_like(blocks)
            half = calibration_size // 2
            images = torch.cat([noise[:half], smooth[half:]]).clamp(0, 255).to(torch.uint8)
            with torch.no_grad():
                _, logits = net(images)
            net.fc.weight.data.mul_(3.0 / logits.std())
    finally:
        fe.load_state_dict_from_url = original
    torch.save({k: v.detach().clone() for k, v in nn.Module.state_dict(net).items()}, path)
    return path


# ----------------------------------------------------------------------------------------------
# torchmetrics
# ----------------------------------------------------------------------------------------------


def _load_reference(reference, feature: str):
    if reference is None:
        return None
    if isinstance(reference, (str, os.PathLike)):
        keys = ("mu", "sigma") if feature == "pool" else ("mu_s", "sigma_s")
        with np.load(reference) as data:
            if not all(k in data.files for k in keys):
                raise ValueError(
                    f"{reference}: no stored {keys[0]}/{keys[1]} (arrays: {data.files}); use a reference batch "
                    "with statistics (the released VIRTUAL_*.npz files have them) or update the metric with "
                    "real=True images instead"
                )
            return np.asarray(data[keys[0]], np.float64), np.asarray(data[keys[1]], np.float64)
    mu, sigma = reference
    return np.asarray(mu, np.float64), np.asarray(sigma, np.float64)


class ADMFrechetInceptionDistance(Metric):
    """FID (Heusel et al. 2017, eq. 6) on the ADM evaluator's 2048 pool features, as a torchmetrics
    ``Metric``: per-process sums of features and outer products (float64) are summed across
    processes by torchmetrics, so the result equals the evaluator's FID on all gathered samples.

    ``reference``: a reference batch ``.npz`` with stored ``mu``/``sigma`` (``mu_s``/``sigma_s`` for
    sFID), a ``(mu, sigma)`` pair, or ``None`` to accumulate real images with ``update(x, real=True)``.
    ``update`` takes uint8 images (N, 3, H, W) / (N, H, W, 3), or floating images in [-1, 1] that are
    converted with the original's ``((x + 1) * 127.5).clamp(0, 255).to(torch.uint8)``, or
    precomputed ``features=`` (N, D). ``extractor`` shares one :class:`ADMInception` between metrics.
    ``reset_real_features=False`` keeps accumulated real statistics across ``reset()``;
    ``fid_method="eigh"`` is the faster eigenvalue route of :func:`guided_pipelines.metrics.frechet_distance`.
    """

    feature = "pool"
    feature_dim = POOL_DIM
    higher_is_better = False
    is_differentiable = False
    full_state_update = False

    def __init__(
        self,
        reference=None,
        inception_weights: str | None = None,
        extractor: ADMInception | None = None,
        reset_real_features: bool = True,
        fid_method: str = "sqrtm",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if fid_method not in ("sqrtm", "eigh"):
            raise ValueError(f"fid_method must be 'sqrtm' (the original's) or 'eigh' (faster), got {fid_method!r}")
        self.fid_method = fid_method
        self.inception_weights = inception_weights
        self.extractor = extractor  # built on the first update with images, so features-only use needs no weights
        self.reset_real_features = reset_real_features
        self._reference = _load_reference(reference, self.feature)
        if self._reference is not None and self._reference[0].shape != (self.feature_dim,):
            raise ValueError(
                f"reference mean has shape {self._reference[0].shape}, expected ({self.feature_dim},) "
                f"for {type(self).__name__}"
            )
        d = self.feature_dim
        for side in ("fake", "real"):
            self.add_state(f"{side}_sum", torch.zeros(d, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_outer", torch.zeros(d, d, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_n", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def _features(self, images) -> torch.Tensor:
        if isinstance(images, torch.Tensor) and images.is_floating_point():
            images = ((images + 1) * 127.5).clamp(0, 255).to(torch.uint8)
        if self.extractor is None:
            self.extractor = ADMInception(self.inception_weights).to(self.device)
        pool, spatial, _ = self.extractor(images)
        return pool if self.feature == "pool" else spatial

    def update(self, images=None, real: bool = False, features=None) -> None:
        if (images is None) == (features is None):
            raise ValueError("pass either images or features= to update()")
        feats = self._features(images) if features is None else torch.as_tensor(features)
        if feats.ndim != 2 or feats.shape[1] != self.feature_dim:
            raise ValueError(f"features must be (N, {self.feature_dim}), got {tuple(feats.shape)}")
        feats = feats.to(device=self.fake_sum.device, dtype=torch.float64)
        side = "real" if real else "fake"
        setattr(self, f"{side}_sum", getattr(self, f"{side}_sum") + feats.sum(0))
        setattr(self, f"{side}_outer", getattr(self, f"{side}_outer") + feats.T @ feats)
        setattr(self, f"{side}_n", getattr(self, f"{side}_n") + feats.shape[0])

    def _statistics(self, side: str):
        n = int(getattr(self, f"{side}_n"))
        if n < 2:
            return None
        total = getattr(self, f"{side}_sum").cpu().numpy()
        outer = getattr(self, f"{side}_outer").cpu().numpy()
        mu = total / n
        sigma = (outer - n * np.outer(mu, mu)) / (n - 1)
        return mu, sigma

    def compute(self) -> torch.Tensor:
        fake = self._statistics("fake")
        if fake is None:
            raise ValueError("FID needs at least 2 generated images; call update(images) first")
        real = self._statistics("real") or self._reference
        if real is None:
            raise ValueError(
                "no reference statistics: pass reference=REF.npz (or (mu, sigma)) or update(images, real=True)"
            )
        fid = frechet_distance(fake[0], fake[1], real[0], real[1], method=self.fid_method)
        return torch.tensor(fid, dtype=torch.float64)

    def reset(self) -> None:
        if self.reset_real_features:
            super().reset()
            return
        kept = {k: getattr(self, k) for k in ("real_sum", "real_outer", "real_n")}
        super().reset()
        for k, v in kept.items():
            setattr(self, k, v)


class ADMSpatialFrechetInceptionDistance(ADMFrechetInceptionDistance):
    """sFID (Nash et al. 2021) as in the ADM evaluator: FID on the 2023 spatial features (first 7
    channels of ``mixed_6/conv``, NHWC order); same arguments as ADMFrechetInceptionDistance, with
    the reference batch's ``mu_s``/``sigma_s``."""

    feature = "spatial"
    feature_dim = SPATIAL_DIM
