"""The Inception features, the .npz reader and the ``evaluate`` command, run end to end with a
randomly initialised Inception network saved like torch-fidelity's weights file."""

import json
import os

import numpy as np
import pytest
import torch

from guided_pipelines import cli, evaluator, inception, metrics


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return inception.make_random_inception_weights(str(tmp_path_factory.mktemp("inception") / "random.pth"), seed=0)


@pytest.fixture(scope="module")
def net(weights):
    return inception.ADMInception(weights)


def images(seed, n, size=32):
    rng = np.random.default_rng(seed)
    # Smooth-ish random images: a random low-resolution pattern upsampled plus noise.
    low = rng.integers(0, 256, (n, 4, 4, 3)).astype(np.float64)
    up = np.repeat(np.repeat(low, size // 4, axis=1), size // 4, axis=2)
    return np.clip(up + rng.normal(0, 30, up.shape), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------


def test_spatial_flattening_is_nhwc():
    x = torch.arange(2 * 9 * 17 * 17, dtype=torch.float32).reshape(2, 9, 17, 17)
    flat = inception.spatial_features_nhwc(x)
    assert flat.shape == (2, 2023)
    np.testing.assert_array_equal(flat.numpy(), x[:, :7].permute(0, 2, 3, 1).numpy().reshape(2, -1))
    for h, w, c in [(0, 0, 1), (3, 5, 6), (16, 16, 0)]:
        assert flat[1, (h * 17 + w) * 7 + c] == x[1, c, h, w]


def test_features_are_mixed_6d_branch1x1_pool_and_unbiased_logits(net):
    import torch.nn.functional as F
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    batch = images(1, 2)
    pool, spatial, logits = net(batch)
    assert pool.shape == (2, 2048) and spatial.shape == (2, 2023) and logits.shape == (2, 1008)
    assert pool.dtype == spatial.dtype == logits.dtype == torch.float32

    # Independent forward through the same layers, reading Mixed_6d's 1x1 branch directly.
    m = net.net
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).float()
    x = interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
    x = (x - 128) / 128
    with torch.no_grad():
        for name in ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1",
                     "Conv2d_4a_3x3", "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a",
                     "Mixed_6b", "Mixed_6c"]:
            x = getattr(m, name)(x)
        branch = m.Mixed_6d.branch1x1(x)  # conv + batch norm + ReLU: TF's mixed_6/conv:0
        assert branch.shape == (2, 192, 17, 17) and bool((branch >= 0).all())
        expected_spatial = branch.numpy()[:, :7].transpose(0, 2, 3, 1).reshape(2, -1)
        rest = x
        for name in ["Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"]:
            rest = getattr(m, name)(rest)
        expected_pool = F.adaptive_avg_pool2d(rest, 1).flatten(1)
    np.testing.assert_allclose(spatial.numpy(), expected_spatial, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pool.numpy(), expected_pool.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits.numpy(), (expected_pool @ m.fc.weight.T).numpy(), rtol=1e-4, atol=1e-5)
    # NCHW input gives the same features; float input is refused with the conversion to use.
    pool2, _, _ = net(torch.from_numpy(batch).permute(0, 3, 1, 2))
    assert torch.equal(pool, pool2)
    with pytest.raises(ValueError, match=r"\(\(x \+ 1\) \* 127.5\)"):
        net(batch.astype(np.float32))


def test_random_weights_file_loads_in_torch_fidelity(weights):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    fe = FeatureExtractorInceptionV3("x", ["2048"], feature_extractor_weights_path=weights)  # strict load
    state = torch.load(weights, weights_only=True)
    assert set(state) == set(fe.state_dict())
    with pytest.raises(FileNotFoundError, match="--inception-weights"):
        inception.ADMInception(weights + ".missing")


# ---------------------------------------------------------------------------------------------
# .npz reader
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("save", ["plain", "compressed", "fortran"])
def test_npz_reader_streams_exact_batches(tmp_path, save):
    arr = images(2, 23, size=8)
    path = str(tmp_path / "b.npz")
    if save == "plain":
        np.savez(path, arr_0=arr, arr_1=np.arange(23))
    elif save == "compressed":
        np.savez_compressed(path, arr_0=arr)
    else:
        np.savez(path, arr_0=np.asfortranarray(arr))
    reader = evaluator.open_images(path)
    assert reader.memory_mapped == (save == "plain")
    assert len(reader) == 23 and reader.shape == arr.shape and reader.dtype == np.uint8
    batches = list(reader.batches(5))
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
    np.testing.assert_array_equal(np.concatenate(batches), arr)


def test_npz_reader_errors(tmp_path):
    def save(name, **arrays):
        path = str(tmp_path / name)
        np.savez(path, **arrays)
        return path

    good = images(3, 4, size=8)
    cases = [
        (save("noarr.npz", images=good), r"no 'arr_0' array \(arrays: \['images'\]\).*np.savez"),
        (save("pm1.npz", arr_0=good.astype(np.float32) / 127.5 - 1), r"\[-1, 1\].*\(\(x \+ 1\) \* 127.5\)"),
        (save("unit.npz", arr_0=good.astype(np.float32) / 255), r"\[0, 1\].*x \* 255"),
        (save("i64.npz", arr_0=good.astype(np.int64) * 4), r"int64.*outside \[0, 255\]"),
        (save("nchw.npz", arr_0=good.transpose(0, 3, 1, 2)), r"NCHW.*transpose\(0, 2, 3, 1\)"),
        (save("gray.npz", arr_0=good[..., 0]), r"shape \(4, 8, 8\).*grayscale"),
        (save("rgba.npz", arr_0=np.concatenate([good, good[..., :1]], -1)), r"convert to RGB"),
        (save("empty.npz", arr_0=good[:0]), r"no images"),
    ]
    for path, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            evaluator.open_images(path)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not an .npz archive"):
        evaluator.open_images(str(bad))
    with pytest.raises(FileNotFoundError):
        evaluator.open_images(str(tmp_path / "missing.npz"))


def test_evaluate_rejects_mismatches_before_running_inception(tmp_path):
    ref = str(tmp_path / "ref.npz")
    sample = str(tmp_path / "sample.npz")
    np.savez(ref, arr_0=images(4, 5, size=16))
    np.savez(sample, arr_0=images(5, 5, size=8))
    with pytest.raises(ValueError, match="16x16 but samples are 8x8.*--allow-resolution-mismatch"):
        evaluator.evaluate(ref, sample, inception_weights="/nonexistent")
    np.savez(ref, arr_0=images(4, 5, size=8), mu=np.zeros(2048), sigma=np.eye(3))
    with pytest.raises(ValueError, match=r"stored sigma has shape \(3, 3\), expected \(2048, 2048\)"):
        evaluator.evaluate(ref, sample, inception_weights="/nonexistent")
    np.savez(ref, arr_0=images(4, 5, size=8), mu=np.zeros(2048))
    with pytest.raises(ValueError, match="only one of mu/sigma"):
        evaluator.evaluate(ref, sample, inception_weights="/nonexistent")
    # The CLI turns these into a one-line error and exit status 1.
    np.savez(ref, arr_0=images(4, 5, size=16))
    assert cli.main(["evaluate", ref, sample, "--no-cache"]) == 1


# ---------------------------------------------------------------------------------------------
# The whole command
# ---------------------------------------------------------------------------------------------


def test_evaluate_cli_end_to_end(tmp_path, weights, net, capsys):
    ref_images, sample_images = images(10, 8), images(11, 6)
    ref = str(tmp_path / "ref.npz")
    sample = str(tmp_path / "samples.npz")
    np.savez(ref, arr_0=ref_images)
    np.savez_compressed(sample, arr_0=sample_images, arr_1=np.arange(6))
    cache = str(tmp_path / "cache")
    out = str(tmp_path / "out.json")
    argv = ["evaluate", ref, sample, "--inception-weights", weights, "--json", out, "--cache-dir", cache,
            "--device", "cpu", "--fid-method", "eigh", "--batch-size", "5", "--infinity-points", "4"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr()
    lines = printed.out.splitlines()
    assert [line.split(":")[0] for line in lines[:5]] == ["Inception Score", "FID", "sFID", "Precision", "Recall"]
    assert lines[5] == "N: 6 samples, 8 reference images"
    assert lines[6].startswith("FID_inf: ") and lines[7].startswith("IS_inf: ")
    assert "6 samples < 50,000" in printed.err
    result = json.load(open(out))

    # Independent computation from the network and the metric functions.
    rp, rs, _ = net(ref_images)
    sp, ss, sl = net(sample_images)
    probs = torch.softmax(sl.double(), dim=1).numpy()
    assert result["num_samples"] == 6 and result["num_reference"] == 8
    assert result["fid"] == pytest.approx(metrics.fid_from_features(sp.numpy(), rp.numpy(), method="eigh"), rel=1e-5)
    assert result["sfid"] == pytest.approx(metrics.fid_from_features(ss.numpy(), rs.numpy(), method="eigh"), rel=1e-5)
    assert result["inception_score"] == pytest.approx(metrics.inception_score(probs), rel=1e-5)
    pr = metrics.precision_recall(rp.numpy(), sp.numpy(), device="cpu")
    assert (result["precision"], result["recall"]) == (pr.precision, pr.recall)
    assert result["fid"] > 0 and result["inception_score"] > 1
    assert all(np.isfinite(result[k]) for k in ("inception_score", "fid", "sfid", "precision", "recall"))
    assert len(result["fid_infinity_fit"]["sizes"]) == 4 and np.isfinite(result["fid_infinity"])

    # Second run: activations come from the cache (two files, keyed by file and weights).
    assert len([f for f in os.listdir(cache) if f.endswith(".features.npz")]) == 2
    assert cli.main(argv[:-2] + ["--infinity-points", "0", "--json", out + "2"]) == 0
    assert printed.err.count("using cached") == 0 and capsys.readouterr().err.count("using cached activations") == 2
    again = json.load(open(out + "2"))
    for key in ("inception_score", "fid", "sfid", "precision", "recall"):
        assert again[key] == result[key]
    assert again["fid_infinity"] is None


def test_evaluate_uses_stored_reference_statistics(tmp_path, weights, net):
    # A reference batch whose stored mu/sigma/mu_s/sigma_s are the samples' own statistics: FID and
    # sFID must then be ~0 although the reference images differ from the samples.
    sample_images = images(20, 6)
    sp, ss, _ = net(sample_images)
    pool_stats, spatial_stats = metrics.compute_statistics(sp.numpy()), metrics.compute_statistics(ss.numpy())
    ref = str(tmp_path / "ref_stats.npz")
    np.savez(ref, arr_0=images(21, 5), mu=pool_stats.mu, sigma=pool_stats.sigma, mu_s=spatial_stats.mu,
             sigma_s=spatial_stats.sigma)
    sample = str(tmp_path / "s.npz")
    np.savez(sample, arr_0=sample_images)
    cache = str(tmp_path / "cache")
    result = evaluator.evaluate(ref, sample, inception_weights=weights, device="cpu", fid_method="eigh",
                                infinity_points=0, cache_dir=cache, log=lambda *_: None)
    assert abs(result["fid"]) < 1e-6 * np.trace(pool_stats.sigma)
    assert abs(result["sfid"]) < 1e-6 * np.trace(spatial_stats.sigma)
    assert result["precision"] is not None and result["num_reference"] == 5

    # Statistics without images: FID / sFID only.
    stats_only = str(tmp_path / "stats_only.npz")
    np.savez(stats_only, mu=pool_stats.mu, sigma=pool_stats.sigma)
    logged = []
    result = evaluator.evaluate(stats_only, sample, inception_weights=weights, device="cpu", fid_method="eigh",
                                infinity_points=0, cache_dir=cache, log=logged.append)
    assert any("using cached activations" in line for line in logged)
    assert abs(result["fid"]) < 1e-6 * np.trace(pool_stats.sigma)
    assert result["sfid"] is None and result["precision"] is None
    assert "n/a" in evaluator.format_report(result)


def test_cache_key_changes_with_file_and_weights(tmp_path):
    path = tmp_path / "a.npz"
    np.savez(path, arr_0=images(0, 2, size=8))
    k1 = evaluator.cache_path("c", str(path), "w1")
    assert k1 != evaluator.cache_path("c", str(path), "w2")
    os.utime(path, ns=(0, 12345))
    assert evaluator.cache_path("c", str(path), "w1") != k1


def test_torchmetrics_fid_on_images(net):
    from guided_pipelines.inception import ADMFrechetInceptionDistance, ADMSpatialFrechetInceptionDistance

    batch = torch.from_numpy(images(30, 2)).permute(0, 3, 1, 2)
    as_float = batch.float() / 127.5 - 1  # model-space samples in [-1, 1]
    fid = ADMFrechetInceptionDistance(extractor=net)
    fid.update(as_float)
    sfid = ADMSpatialFrechetInceptionDistance(extractor=net)
    sfid.update(batch)
    pool, _, _ = net(((as_float + 1) * 127.5).clamp(0, 255).to(torch.uint8))  # the original's conversion
    _, spatial, _ = net(batch)
    assert int(fid.fake_n) == 2 and int(sfid.fake_n) == 2
    torch.testing.assert_close(fid.fake_sum, pool.double().sum(0))
    torch.testing.assert_close(sfid.fake_outer, spatial.double().T @ spatial.double())
    with pytest.raises(ValueError, match="no reference statistics"):
        fid.compute()


def test_corrupt_inception_weights_file_is_a_clear_error(tmp_path):
    from guided_pipelines.inception import _build_extractor

    bad = tmp_path / "weights.pth"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="is not a torch-fidelity Inception-v3 state_dict"):
        _build_extractor(str(bad))
