"""ADM's Gaussian diffusion process as a diffusers scheduler, with the original respacing and
classifier guidance (Dhariwal & Nichol 2021, Algorithms 1 and 2).

All schedule arrays are computed in float64 and gathered per timestep before the float32 update,
exactly as the original ``gaussian_diffusion.py`` does, so that trajectories agree to float rounding."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

BETA_SCHEDULES = ("linear", "cosine")
VARIANCE_TYPES = ("learned_range", "fixed_small", "fixed_large")
PREDICTION_TYPES = ("epsilon", "sample")


def get_named_beta_schedule(name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """β_t of the linear schedule (Ho et al. 2020, scaled to the step count) or the cosine schedule
    ᾱ_t = cos²((t/T + s)/(1 + s)·π/2), s = 0.008, β_t ≤ 0.999 (Nichol & Dhariwal 2021, Eq. 17)."""
    if name == "linear":
        scale = 1000 / num_diffusion_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if name == "cosine":

        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [
            min(1 - alpha_bar((i + 1) / num_diffusion_timesteps) / alpha_bar(i / num_diffusion_timesteps), 0.999)
            for i in range(num_diffusion_timesteps)
        ]
        return np.array(betas, dtype=np.float64)
    raise ValueError(f"unknown beta_schedule {name!r}; choose one of {', '.join(BETA_SCHEDULES)}")


def space_timesteps(num_timesteps: int, section_counts: str | list) -> list[int]:
    """The kept timesteps for a respacing string, as the original ``space_timesteps``.

    ``"250"`` keeps 250 evenly strided steps; ``"10,15,20"`` splits the process into three equal
    sections with 10, 15 and 20 steps; ``"ddimN"`` keeps ``range(0, T, stride)`` for the integer
    stride that gives exactly N steps (DDIM's uniform skipping). Returns the sorted list."""
    if isinstance(section_counts, str):
        text = section_counts.strip()
        if text.startswith("ddim"):
            try:
                desired = int(text[len("ddim") :])
            except ValueError:
                raise ValueError(f"bad respacing {section_counts!r}: expected 'ddimN' with an integer N") from None
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(
                f"respacing {section_counts!r}: cannot create exactly {desired} steps out of {num_timesteps} "
                "with an integer stride; pick another N or use a plain count such as "
                f"'{min(desired, num_timesteps)}'"
            )
        try:
            counts = [int(x) for x in text.split(",")]
        except ValueError:
            raise ValueError(
                f"bad respacing {section_counts!r}: expected 'N', 'N1,N2,...' or 'ddimN'"
            ) from None
    else:
        counts = [int(x) for x in section_counts]
    if not counts or any(c < 1 for c in counts):
        raise ValueError(f"bad respacing {section_counts!r}: every section needs at least one step")
    size_per = num_timesteps // len(counts)
    extra = num_timesteps % len(counts)
    start = 0
    kept = []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(
                f"respacing {section_counts!r}: cannot take {count} steps from a section of {size} "
                f"(the model was trained with {num_timesteps} steps)"
            )
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            kept.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(kept))


class GaussianDiffusionProcess:
    """The float64 tables of one (possibly respaced) diffusion process and its closed forms
    (Ho et al. 2020, Eqs. 4, 6, 7, 11). ``t`` arguments are indices into this process's steps."""

    def __init__(self, betas: np.ndarray, timestep_map: list[int]):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or (betas <= 0).any() or (betas > 1).any():
            raise ValueError("betas must be a 1-D array in (0, 1]")
        self.betas = betas
        self.num_timesteps = len(betas)
        self.timestep_map = list(timestep_map)
        alphas = 1.0 - betas
        ac = np.cumprod(alphas, axis=0)
        ac_prev = np.append(1.0, ac[:-1])
        self.alphas_cumprod = ac
        self.alphas_cumprod_prev = ac_prev
        self.sqrt_alphas_cumprod = np.sqrt(ac)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - ac)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / ac)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / ac - 1)
        # q(x_{t-1} | x_t, x_0): β̃_t and the mean coefficients (Ho et al. 2020, Eq. 7).
        self.posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:])
            if len(betas) > 1
            else np.maximum(self.posterior_variance, 1e-20)
        )
        self.posterior_mean_coef1 = betas * np.sqrt(ac_prev) / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac)
        self.log_betas = np.log(betas)
        large = np.append(self.posterior_variance[1], betas[1:]) if len(betas) > 1 else betas
        self.fixed_large_variance = large
        self.fixed_large_log_variance = np.log(large)

    @staticmethod
    def extract(arr: np.ndarray, t: torch.Tensor, shape) -> torch.Tensor:
        """Gather float64 table entries at ``t``, cast to float32, broadcast to ``shape``."""
        res = torch.from_numpy(arr).to(device=t.device)[t].float()
        return res.reshape(-1, *([1] * (len(shape) - 1))).expand(shape)

    def q_sample(self, x_start, t, noise):
        """x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε (Ho et al. 2020, Eq. 4)."""
        return (
            self.extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + self.extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t−1} | x_t, x_0)."""
        mean = (
            self.extract(self.posterior_mean_coef1, t, x_t.shape) * x_start
            + self.extract(self.posterior_mean_coef2, t, x_t.shape) * x_t
        )
        return (
            mean,
            self.extract(self.posterior_variance, t, x_t.shape),
            self.extract(self.posterior_log_variance_clipped, t, x_t.shape),
        )

    def predict_xstart_from_eps(self, x_t, t, eps):
        return (
            self.extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - self.extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps
        )

    def predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return (self.extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart) / self.extract(
            self.sqrt_recipm1_alphas_cumprod, t, x_t.shape
        )

    def p_mean_variance(self, model_output, x_t, t, variance_type, prediction_type, clip_denoised):
        """p_θ(x_{t−1} | x_t): mean, variance, log-variance and the predicted x_0.

        Learned range: log Σ = v·log β_t + (1−v)·log β̃_t with v = (output + 1)/2
        (Nichol & Dhariwal 2021, Eq. 15)."""
        channels = x_t.shape[1]
        if variance_type == "learned_range":
            if model_output.shape[1] != 2 * channels:
                raise ValueError(
                    f"variance_type='learned_range' needs a model with {2 * channels} output channels, "
                    f"got {model_output.shape[1]}; use a fixed variance_type for this model"
                )
            model_output, var_values = torch.split(model_output, channels, dim=1)
            min_log = self.extract(self.posterior_log_variance_clipped, t, x_t.shape)
            max_log = self.extract(self.log_betas, t, x_t.shape)
            frac = (var_values + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            if model_output.shape[1] == 2 * channels:
                model_output = model_output[:, :channels]
            if variance_type == "fixed_large":
                variance = self.extract(self.fixed_large_variance, t, x_t.shape)
                log_variance = self.extract(self.fixed_large_log_variance, t, x_t.shape)
            else:
                variance = self.extract(self.posterior_variance, t, x_t.shape)
                log_variance = self.extract(self.posterior_log_variance_clipped, t, x_t.shape)
        if prediction_type == "epsilon":
            pred_xstart = self.predict_xstart_from_eps(x_t, t, model_output)
        else:
            pred_xstart = model_output
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}


@dataclass
class ADMSchedulerOutput(BaseOutput):
    """``prev_sample`` x_{t−1} and ``pred_original_sample`` x̂_0 (after guidance, for DDIM)."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class ADMScheduler(SchedulerMixin, ConfigMixin):
    """Ancestral (DDPM) and DDIM sampling of ADM with the original timestep respacing and classifier
    guidance.

    Guidance (Dhariwal & Nichol 2021): with g = s·∇_x log p_φ(y | x_t),
    ancestral sampling shifts the mean, μ + Σ·g (Algorithm 1); DDIM shifts the noise,
    ε̂ = ε_θ − √(1−ᾱ_t)·g (Algorithm 2, Eq. 14), and x̂_0 is recomputed from ε̂ without re-clipping.

    ``timesteps`` and the ``timestep`` passed to :meth:`step` are original-scale indices (0 … T−1);
    models and classifiers always receive these."""

    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        variance_type: str = "learned_range",
        prediction_type: str = "epsilon",
        clip_sample: bool = True,
    ):
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(f"unknown variance_type {variance_type!r}; choose one of {', '.join(VARIANCE_TYPES)}")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"unknown prediction_type {prediction_type!r}; choose one of {', '.join(PREDICTION_TYPES)}"
            )
        self.base_betas = get_named_beta_schedule(beta_schedule, num_train_timesteps)
        base_ac = np.cumprod(1.0 - self.base_betas)
        # Training runs on the process "respaced" to all steps, exactly as the original
        # (create_gaussian_diffusion always builds a SpacedDiffusion).
        self.train_process = self._respaced(base_ac, list(range(num_train_timesteps)))
        self.alphas_cumprod = torch.from_numpy(base_ac)
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.process = self.train_process
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1)
        self._index = {t: t for t in range(num_train_timesteps)}

    @staticmethod
    def _respaced(base_alphas_cumprod: np.ndarray, kept: list[int]) -> GaussianDiffusionProcess:
        betas, last = [], 1.0
        for i in kept:
            betas.append(1 - base_alphas_cumprod[i] / last)
            last = base_alphas_cumprod[i]
        return GaussianDiffusionProcess(np.array(betas), kept)

    def set_timesteps(
        self, num_inference_steps: int | None = None, device: str | torch.device | None = None, respacing=None
    ):
        """Keep the steps of ``respacing`` (the original strings: ``"250"``, ``"ddim25"``,
        ``"10,15,20"``); ``num_inference_steps=N`` means ``"N"``. Betas are recomputed so that the kept
        steps have the original ᾱ: β'_i = 1 − ᾱ_{t_i} / ᾱ_{t_{i−1}}."""
        T = self.config.num_train_timesteps
        if respacing is None:
            if num_inference_steps is None:
                num_inference_steps = T
            if int(num_inference_steps) != num_inference_steps or num_inference_steps < 1:
                raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
            if num_inference_steps > T:
                raise ValueError(
                    f"num_inference_steps={num_inference_steps} exceeds the {T} steps the model was trained with"
                )
            respacing = str(int(num_inference_steps))
        kept = space_timesteps(T, respacing)
        if kept[-1] >= T:
            raise ValueError(f"respacing {respacing!r} asks for more steps than the {T} trained")
        self.process = self._respaced(np.cumprod(1.0 - self.base_betas), kept)
        self._index = {t: i for i, t in enumerate(kept)}
        self.num_inference_steps = len(kept)
        self.timesteps = torch.tensor(kept[::-1], dtype=torch.long, device=device)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def _indices(self, timestep, sample: torch.Tensor) -> torch.Tensor:
        ts = torch.as_tensor(timestep).reshape(-1).tolist()
        try:
            idx = [self._index[int(t)] for t in ts]
        except KeyError as err:
            raise ValueError(
                f"timestep {err.args[0]} is not among the kept steps {self.timesteps.tolist()[:8]}…; "
                "pass a value from scheduler.timesteps"
            ) from None
        if len(idx) == 1:
            idx = idx * sample.shape[0]
        return torch.tensor(idx, dtype=torch.long, device=sample.device)

    def p_mean_variance(self, model_output, timestep, sample):
        """Mean/variance/x̂_0 of p_θ(x_{t−1} | x_t) at original-scale ``timestep``."""
        t = self._indices(timestep, sample)
        return self.process.p_mean_variance(
            model_output, sample, t, self.config.variance_type, self.config.prediction_type, self.config.clip_sample
        )

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator=None,
        variance_noise: torch.Tensor | None = None,
        guidance_gradient: torch.Tensor | None = None,
        use_ddim: bool = False,
        eta: float = 0.0,
        return_dict: bool = True,
    ):
        """One reverse step x_t → x_{t−1}.

        ``guidance_gradient`` is s·∇_x log p_φ(y | x_t) (already scaled). ``variance_noise`` replaces
        the standard-normal draw (for reproducing a trajectory); no noise is added at t = 0."""
        proc = self.process
        t = self._indices(timestep, sample)
        out = proc.p_mean_variance(
            model_output, sample, t, self.config.variance_type, self.config.prediction_type, self.config.clip_sample
        )
        if variance_noise is None:
            variance_noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        nonzero = (t != 0).float().reshape(-1, *([1] * (sample.ndim - 1)))
        if use_ddim:
            pred_xstart = out["pred_xstart"]
            if guidance_gradient is not None:
                alpha_bar = proc.extract(proc.alphas_cumprod, t, sample.shape)
                eps = proc.predict_eps_from_xstart(sample, t, pred_xstart)
                eps = eps - (1 - alpha_bar).sqrt() * guidance_gradient
                pred_xstart = proc.predict_xstart_from_eps(sample, t, eps)
            eps = proc.predict_eps_from_xstart(sample, t, pred_xstart)
            alpha_bar = proc.extract(proc.alphas_cumprod, t, sample.shape)
            alpha_bar_prev = proc.extract(proc.alphas_cumprod_prev, t, sample.shape)
            sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
            mean = pred_xstart * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
            prev = mean + nonzero * sigma * variance_noise
        else:
            pred_xstart = out["pred_xstart"]
            mean = out["mean"]
            if guidance_gradient is not None:
                mean = mean.float() + out["variance"] * guidance_gradient.float()
            prev = mean + nonzero * torch.exp(0.5 * out["log_variance"]) * variance_noise
        if not return_dict:
            return (prev, pred_xstart)
        return ADMSchedulerOutput(prev_sample=prev, pred_original_sample=pred_xstart)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """q_sample on the full training process: x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε."""
        timesteps = torch.as_tensor(timesteps, device=original_samples.device).reshape(-1)
        if timesteps.numel() == 1:
            timesteps = timesteps.expand(original_samples.shape[0])
        return self.train_process.q_sample(original_samples, timesteps, noise)

    def dpm_solver(self, **overrides):
        """A DPM-Solver++ scheduler (diffusers) on the same betas that, like ADM's sampler, clips x̂_0
        to [−1, 1] (thresholding with a maximum of 1 is a static clip) and, for the cosine schedule,
        clips λ_min (ᾱ_T ≈ 0 would blow up the first x̂_0)."""
        from diffusers import DPMSolverMultistepScheduler

        kwargs = dict(
            num_train_timesteps=self.config.num_train_timesteps,
            trained_betas=self.base_betas.tolist(),
            algorithm_type="dpmsolver++",
            thresholding=self.config.clip_sample,
            sample_max_value=1.0,
        )
        if self.config.beta_schedule == "cosine":
            kwargs["lambda_min_clipped"] = -5.1
        kwargs.update(overrides)
        return DPMSolverMultistepScheduler(**kwargs)

    def __len__(self):
        return self.config.num_train_timesteps
