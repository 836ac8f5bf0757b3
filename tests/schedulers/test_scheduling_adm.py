import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from guided_pipelines import ADMScheduler
from guided_pipelines.schedulers import get_named_beta_schedule, space_timesteps


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_beta_schedules_match_original(fixtures_dir, schedule):
    ref = load_file(fixtures_dir / "beta_schedules.safetensors")[f"betas.{schedule}"]
    ours = torch.from_numpy(get_named_beta_schedule(schedule, 1000))
    assert ours.dtype == torch.float64
    assert torch.equal(ours, ref)


def test_respacing_keeps_original_timesteps(fixtures_dir):
    cases = json.loads((fixtures_dir / "respacing.json").read_text())
    assert len(cases) >= 10
    for text, kept in cases.items():
        assert space_timesteps(1000, text) == kept, text
        scheduler = ADMScheduler()
        scheduler.set_timesteps(respacing=text)
        assert scheduler.timesteps.tolist() == kept[::-1], text


def test_num_inference_steps_means_plain_count():
    a, b = ADMScheduler(), ADMScheduler()
    a.set_timesteps(250)
    b.set_timesteps(respacing="250")
    assert torch.equal(a.timesteps, b.timesteps)
    assert len(a.timesteps) == 250 and a.timesteps[0] == 999 and a.timesteps[-1] == 0


def test_respaced_betas_keep_alphas_cumprod():
    scheduler = ADMScheduler(beta_schedule="cosine")
    scheduler.set_timesteps(respacing="ddim25")
    kept = scheduler.timesteps.flip(0).numpy()
    base = np.cumprod(1 - get_named_beta_schedule("cosine", 1000))
    np.testing.assert_allclose(scheduler.process.alphas_cumprod, base[kept], rtol=1e-12)


@pytest.mark.parametrize(
    "respacing, message",
    [
        ("ddim999", "integer stride"),
        ("ddim0", "integer stride"),
        ("1001", "cannot take 1001 steps"),
        ("600,600", "cannot take 600 steps"),
        ("ddimx", "ddimN"),
        ("fast", "expected"),
        ("0", "at least one step"),
    ],
)
def test_bad_respacing_strings_rejected(respacing, message):
    with pytest.raises(ValueError, match=message):
        ADMScheduler().set_timesteps(respacing=respacing)


def test_more_steps_than_trained_rejected():
    with pytest.raises(ValueError, match="exceeds the 1000 steps"):
        ADMScheduler().set_timesteps(1001)


def test_unknown_config_values_rejected():
    with pytest.raises(ValueError, match="beta_schedule"):
        ADMScheduler(beta_schedule="quadratic")
    with pytest.raises(ValueError, match="variance_type"):
        ADMScheduler(variance_type="learned")
    with pytest.raises(ValueError, match="prediction_type"):
        ADMScheduler(prediction_type="v_prediction")


def test_step_rejects_dropped_timestep():
    scheduler = ADMScheduler(variance_type="fixed_small")
    scheduler.set_timesteps(respacing="10")
    x = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match="not among the kept steps"):
        scheduler.step(torch.zeros_like(x), 998, x)


def test_add_noise_is_q_sample():
    scheduler = ADMScheduler()
    x0, noise = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    t = torch.tensor([0, 500, 999])
    ac = scheduler.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(scheduler.add_noise(x0, noise, t), ac.sqrt() * x0 + (1 - ac).sqrt() * noise)
    # Respacing for sampling does not change the training process.
    scheduler.set_timesteps(respacing="ddim10")
    torch.testing.assert_close(scheduler.add_noise(x0, noise, t), ac.sqrt() * x0 + (1 - ac).sqrt() * noise)


def test_no_noise_added_at_t0_and_guidance_shifts_mean_by_variance():
    scheduler = ADMScheduler(variance_type="fixed_small", clip_sample=False)
    scheduler.set_timesteps(respacing="10")
    x = torch.randn(2, 3, 4, 4)
    eps = torch.randn_like(x)
    grad = torch.randn_like(x)
    a = scheduler.step(eps, 0, x, variance_noise=torch.randn_like(x)).prev_sample
    b = scheduler.step(eps, 0, x, variance_noise=torch.randn_like(x)).prev_sample
    assert torch.equal(a, b)
    t = int(scheduler.timesteps[3])
    noise = torch.randn_like(x)
    plain = scheduler.step(eps, t, x, variance_noise=noise).prev_sample
    guided = scheduler.step(eps, t, x, variance_noise=noise, guidance_gradient=grad).prev_sample
    variance = scheduler.p_mean_variance(eps, t, x)["variance"]
    torch.testing.assert_close(guided - plain, variance * grad)


def test_config_round_trip(tmp_path):
    scheduler = ADMScheduler(beta_schedule="cosine", variance_type="fixed_large", clip_sample=False)
    scheduler.save_pretrained(tmp_path)
    again = ADMScheduler.from_pretrained(tmp_path)
    keys = ("num_train_timesteps", "beta_schedule", "variance_type", "prediction_type", "clip_sample")
    assert {k: again.config[k] for k in keys} == {k: scheduler.config[k] for k in keys}


def test_dpm_solver_is_configured_like_adm():
    cosine = ADMScheduler(beta_schedule="cosine").dpm_solver()
    assert cosine.config.algorithm_type == "dpmsolver++"
    assert cosine.config.thresholding and cosine.config.sample_max_value == 1.0
    assert cosine.config.lambda_min_clipped == -5.1
    torch.testing.assert_close(cosine.alphas_cumprod.double(), ADMScheduler(beta_schedule="cosine").alphas_cumprod, atol=1e-6, rtol=0)
    linear = ADMScheduler(clip_sample=False).dpm_solver(solver_order=3)
    assert not linear.config.thresholding and linear.config.lambda_min_clipped == -float("inf")
    assert linear.config.solver_order == 3
