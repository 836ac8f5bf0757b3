"""Metric parity with the original ADM evaluator (tests/fixtures/evaluator/features_small.npz) and
the behaviour of FID_inf, IS_inf, the bootstrap interval and the torchmetrics classes."""

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from guided_pipelines import metrics

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "evaluator", "features_small.npz")
FP16_ULP_REL = 2.0**-10


@pytest.fixture(scope="module")
def ref():
    with np.load(FIXTURE) as data:
        return {k: data[k] for k in data.files}


def rel(a, b):
    return abs(float(a) / float(b) - 1)


# ---------------------------------------------------------------------------------------------
# FID / sFID / IS parity
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_fid_and_sfid_match_original(ref, method):
    assert rel(metrics.fid_from_features(ref["sample"], ref["ref"], method=method), ref["fid"]) <= 1e-6
    assert rel(metrics.fid_from_features(ref["spatial_sample"], ref["spatial_ref"], method=method), ref["sfid"]) <= 1e-6
    s, r = metrics.compute_statistics(ref["sample"]), metrics.compute_statistics(ref["ref"])
    assert s.mu.dtype == np.float64 and s.sigma.dtype == np.float64
    assert rel(metrics.frechet_distance(s.mu, s.sigma, r.mu, r.sigma, method=method), ref["fid"]) <= 1e-6
    assert rel(metrics.fid_against_statistics(ref["sample"], r.mu, r.sigma, method=method), ref["fid"]) <= 1e-6


def test_fid_eigh_small_n_route_matches_sqrtm(ref):
    # n = 30 < D = 64: the eigh route takes the n x n path; the covariance is rank deficient.
    r = metrics.compute_statistics(ref["ref"])
    a = metrics.fid_against_statistics(ref["sample"][:30], r.mu, r.sigma, method="sqrtm")
    b = metrics.fid_against_statistics(ref["sample"][:30], r.mu, r.sigma, method="eigh")
    assert rel(a, b) < 1e-6


def test_inception_score_matches_original(ref):
    split = int(ref["inception_score_split"])
    assert rel(metrics.inception_score(ref["probs"], split_size=split), ref["inception_score"]) <= 1e-6


def test_inception_score_uses_sequential_splits_and_handles_zeros():
    eye = np.eye(10)
    one_hot = np.concatenate([eye, eye])  # each split of 10 covers all classes once -> IS = 10
    assert metrics.inception_score(one_hot, split_size=10) == pytest.approx(10.0, rel=1e-12)
    # Sorted rows: each split of 10 holds only 5 classes twice -> IS = 5 per split.
    sorted_rows = np.repeat(eye, 2, axis=0)
    assert metrics.inception_score(sorted_rows, split_size=10) == pytest.approx(5.0, rel=1e-12)
    assert metrics.inception_score(sorted_rows, split_size=5000) == pytest.approx(10.0, rel=1e-12)
    with pytest.raises(ValueError, match="softmax"):
        metrics.inception_score(np.full((4, 3), 2.0))


def test_frechet_distance_closed_form_and_errors():
    # N(0, 1) vs N(1, 4): 1 + 1 + 4 - 2 * sqrt(4) = 2.
    assert metrics.frechet_distance(0.0, 1.0, 1.0, 4.0) == pytest.approx(2.0, abs=1e-12)
    with pytest.raises(ValueError, match="different lengths"):
        metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="covariances"):
        metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(3))


def test_frechet_distance_singular_fallback_and_imaginary_check(monkeypatch):
    from scipy import linalg

    real_sqrtm = linalg.sqrtm
    calls = []

    def nan_first(m, *args, **kwargs):
        calls.append(m.copy())
        return np.full_like(m, np.nan) if len(calls) == 1 else real_sqrtm(m)

    monkeypatch.setattr(linalg, "sqrtm", nan_first)
    s1, s2 = np.diag([1.0, 2.0]), np.diag([3.0, 4.0])
    with pytest.warns(RuntimeWarning, match="adding 1e-06"):
        value = metrics.frechet_distance(np.zeros(2), s1, np.zeros(2), s2)
    np.testing.assert_allclose(calls[1], (s1 + 1e-6 * np.eye(2)) @ (s2 + 1e-6 * np.eye(2)))
    expected = 1 + 2 + 3 + 4 - 2 * (np.sqrt((1 + 1e-6) * (3 + 1e-6)) + np.sqrt((2 + 1e-6) * (4 + 1e-6)))
    assert value == pytest.approx(expected, abs=1e-12)

    monkeypatch.setattr(linalg, "sqrtm", lambda m, *a, **k: m + 0.5j * np.eye(len(m)))
    with pytest.raises(ValueError, match="imaginary component"):
        metrics.frechet_distance(np.zeros(2), s1, np.zeros(2), s2)
    monkeypatch.setattr(linalg, "sqrtm", lambda m, *a, **k: m + 1e-5j * np.eye(len(m)))
    assert metrics.frechet_distance(np.zeros(2), s1, np.zeros(2), s2) == pytest.approx(10 - 2 * np.trace(s1 @ s2))


# ---------------------------------------------------------------------------------------------
# Precision / recall
# ---------------------------------------------------------------------------------------------


def test_precision_recall_adm_mode_matches_original(ref):
    pr = metrics.precision_recall(ref["ref"], ref["sample"], k=3, mode="adm", device="cpu")
    assert abs(pr.precision - ref["precision"]) <= 0.005
    assert abs(pr.recall - ref["recall"]) <= 0.005
    for ours, theirs in ((pr.radii_ref, ref["radii_ref"]), (pr.radii_sample, ref["radii_sample"])):
        assert ours.dtype == np.float32 and ours.shape == theirs.shape
        # float16 distances: within two float16 ulps, and mostly bit-identical to TensorFlow's.
        np.testing.assert_allclose(ours, theirs, rtol=2 * FP16_ULP_REL, atol=0)
        assert np.mean(ours == theirs) > 0.8
        assert np.array_equal(ours.astype(np.float16).astype(np.float32), ours)


@pytest.mark.parametrize("mode", ["float32", "float64"])
def test_precision_recall_exact_modes(ref, mode):
    pr = metrics.precision_recall(ref["ref"], ref["sample"], k=3, mode=mode, device="cpu")
    assert abs(pr.precision - ref["precision"]) <= 0.005
    assert abs(pr.recall - ref["recall"]) <= 0.005
    # Brute force in float64: squared distance to the 3rd neighbour (self counted as the 0th).
    x = ref["ref"].astype(np.float64)
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    expected = np.sort(d, axis=1)[:, 3]
    np.testing.assert_allclose(pr.radii_ref, expected, rtol=1e-4 if mode == "float32" else 1e-6)


def test_precision_recall_brute_force_definition():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((60, 8)).astype(np.float32)
    b = (rng.standard_normal((50, 8)) * 1.3 + 0.4).astype(np.float32)
    pr = metrics.precision_recall(a, b, k=3, mode="float64", device="cpu")

    def sq(u, v):
        return ((u[:, None, :].astype(np.float64) - v[None, :, :]) ** 2).sum(-1)

    ra = np.sort(sq(a, a), axis=1)[:, 3]
    rb = np.sort(sq(b, b), axis=1)[:, 3]
    precision = np.mean((sq(b, a) <= ra[None, :]).any(axis=1))
    recall = np.mean((sq(a, b) <= rb[None, :]).any(axis=1))
    assert pr.precision == pytest.approx(precision) and pr.recall == pytest.approx(recall)
    assert 0 < pr.precision < 1 and 0 < pr.recall < 1


def test_precision_recall_inclusive_boundary():
    # Points on a line: the 3rd-neighbour radius of 0 is exactly the distance to 3 (9.0); a sample at
    # distance exactly 3 from 0 (i.e. at -3) is inside with <=, outside with <.
    line = np.array([[0.0], [1.0], [2.0], [3.0], [10.0], [11.0], [12.0], [13.0]], dtype=np.float32)
    radii = metrics.manifold_radii(line, k=3, mode="float64", device="cpu")
    assert radii[0] == 9.0
    pr = metrics.precision_recall(line, np.array([[-3.0]] * 4, dtype=np.float32), mode="float64", device="cpu")
    assert pr.precision == 1.0


def test_precision_recall_block_size_invariance(ref):
    full = metrics.precision_recall(ref["ref"], ref["sample"], mode="adm", device="cpu")
    small = metrics.precision_recall(ref["ref"], ref["sample"], mode="adm", device="cpu", row_batch_size=70, col_batch_size=130)
    assert (full.precision, full.recall) == (small.precision, small.recall)
    np.testing.assert_array_equal(full.radii_ref, small.radii_ref)
    np.testing.assert_array_equal(full.radii_sample, small.radii_sample)


def test_adm_distances_fall_back_to_float32_on_float16_overflow(ref):
    big = torch.from_numpy(ref["ref"][:50] * 40)  # squared norms ~ 1e5 > 65504
    adm = metrics.pairwise_squared_distances(big, big, mode="adm")
    f32 = metrics.pairwise_squared_distances(big, big, mode="float32")
    assert torch.equal(adm, f32)
    small = torch.from_numpy(ref["ref"][:50])
    adm = metrics.pairwise_squared_distances(small, small, mode="adm")
    assert torch.equal(adm.half().float(), adm)  # float16 values
    f64 = metrics.pairwise_squared_distances(small, small, mode="float64")
    # |u|^2 - 2 u.v + |v|^2 in float16: errors of a few ulps of the squared norms.
    atol = 8 * FP16_ULP_REL * float((small**2).sum(1).max())
    assert torch.allclose(adm, f64, rtol=0, atol=atol)
    assert not torch.equal(adm, f64)
    with pytest.raises(ValueError, match="distance mode"):
        metrics.pairwise_squared_distances(small, small, mode="bf16")


# ---------------------------------------------------------------------------------------------
# FID_inf / IS_inf / bootstrap
# ---------------------------------------------------------------------------------------------


def test_subset_sizes_follow_chong_forsyth():
    np.testing.assert_array_equal(metrics.subset_sizes(50000), np.linspace(5000, 50000, 15).astype(np.int32))
    small = metrics.subset_sizes(1000)
    assert small[0] == 500 and small[-1] == 1000


def test_fid_infinity_removes_the_one_over_n_bias():
    rng = np.random.default_rng(0)
    dim = 32
    feats = rng.standard_normal((6000, dim))
    ref_mu, ref_sigma = np.full(dim, 0.25), np.eye(dim)
    truth = dim * 0.25**2  # FID between N(0, I) and N(0.25, I)
    ext = metrics.fid_infinity(feats, ref_mu, ref_sigma, num_points=15, min_size=500, seed=0)
    fid_n = metrics.fid_against_statistics(feats[:500], ref_mu, ref_sigma)
    assert len(ext.sizes) == 15 and ext.sizes[0] == 500 and ext.sizes[-1] == 6000
    assert ext.slope > 0  # FID_N decreases with N
    assert abs(ext.value - truth) < 0.2 * abs(fid_n - truth)
    again = metrics.fid_infinity(feats, ref_mu, ref_sigma, num_points=15, min_size=500, seed=0)
    assert again.value == ext.value


def test_is_infinity_extrapolates_linear_trend():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4000, 50)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    ext = metrics.is_infinity(probs, min_size=400)
    assert ext.sizes[0] == 400
    intercept, slope = np.polynomial.polynomial.polyfit(1.0 / ext.sizes, ext.scores, 1)
    assert ext.value == pytest.approx(intercept) and ext.slope == pytest.approx(slope)
    assert ext.scores[-1] == pytest.approx(metrics.inception_score(probs, split_size=4000))


def test_fid_bootstrap_interval(ref):
    r = metrics.compute_statistics(ref["ref"])
    bs = metrics.fid_bootstrap(ref["sample"], r.mu, r.sigma, num_bootstrap=40, seed=3)
    assert bs.fid == pytest.approx(float(ref["fid"]), rel=1e-6)
    assert bs.low < bs.fid < bs.high
    assert bs.high - bs.low < 0.5 * bs.fid
    assert len(bs.replicates) == 40
    assert metrics.fid_bootstrap(ref["sample"], r.mu, r.sigma, num_bootstrap=40, seed=3).low == bs.low


# ---------------------------------------------------------------------------------------------
# torchmetrics classes and import hygiene
# ---------------------------------------------------------------------------------------------


def test_torchmetrics_fid_matches_and_syncs_by_sum(ref):
    base = metrics.ADMFrechetInceptionDistance

    class SmallFID(base):  # the fixture's 64-dim features stand in for the 2048 pool features
        feature_dim = 64

    r = metrics.compute_statistics(ref["ref"])
    a = SmallFID(reference=(r.mu, r.sigma))
    b = SmallFID(reference=(r.mu, r.sigma))
    a.update(features=torch.from_numpy(ref["sample"][:200]))
    b.update(features=torch.from_numpy(ref["sample"][200:]))
    a.merge_state(b)  # what torchmetrics' distributed sync does with the "sum" reductions
    assert rel(a.compute(), ref["fid"]) <= 1e-6

    real = SmallFID(reset_real_features=False)
    real.update(features=torch.from_numpy(ref["ref"]), real=True)
    real.update(features=torch.from_numpy(ref["sample"]))
    assert rel(real.compute(), ref["fid"]) <= 1e-6
    real.reset()
    assert int(real.fake_n) == 0 and int(real.real_n) == len(ref["ref"])
    with pytest.raises(ValueError, match="at least 2"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchmetrics: compute() before update()
        real.compute()
    with pytest.raises(ValueError, match=r"\(N, 64\)"):
        real.update(features=torch.zeros(3, 10))


def test_torchmetrics_sfid_class(ref):
    class SmallSFID(metrics.ADMSpatialFrechetInceptionDistance):
        feature_dim = 128

    assert SmallSFID.feature == "spatial" and metrics.ADMSpatialFrechetInceptionDistance.feature_dim == 2023
    m = SmallSFID(fid_method="eigh")
    m.update(features=torch.from_numpy(ref["spatial_ref"]), real=True)
    m.update(features=torch.from_numpy(ref["spatial_sample"]))
    assert rel(m.compute(), ref["sfid"]) <= 1e-6


def test_metrics_module_imports_without_torchvision_or_diffusers():
    code = (
        "import sys, guided_pipelines.metrics as m; "
        "assert 'torchvision' not in sys.modules and 'diffusers' not in sys.modules "
        "and 'torchmetrics' not in sys.modules, sorted(k for k in sys.modules if 'vision' in k); print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr

