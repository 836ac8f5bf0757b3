"""ADM's training objectives and timestep samplers.

With a learned variance the objective is L_hybrid = L_simple + L_vlb (Nichol & Dhariwal 2021,
Eq. 16, λ = 1 with 1000 steps as in ADM): the MSE on ε trains the mean, and the variational bound
trains only Σ_θ because the mean is frozen (stop-gradient) inside it. With a fixed variance the loss
is L_simple alone (Ho et al. 2020, Eq. 14)."""

from __future__ import annotations

import numpy as np
import torch

from .schedulers.scheduling_adm import ADMScheduler


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=list(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log p(x) of [-1, 1] data discretised to 256 bins under N(means, e^{2·log_scales})
    (Ho et al. 2020, Eq. 13): the decoder term L_0."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def vb_terms_bpd(scheduler: ADMScheduler, model_output, x_start, x_t, timesteps, clip_denoised=False):
    """L_{t−1} = KL(q(x_{t−1}|x_t,x_0) ‖ p_θ(x_{t−1}|x_t)) for t > 0 and −log p_θ(x_0|x_1) at t = 0,
    in bits per dimension."""
    proc = scheduler.train_process
    true_mean, _, true_log_var = proc.q_posterior_mean_variance(x_start, x_t, timesteps)
    out = proc.p_mean_variance(
        model_output, x_t, timesteps, scheduler.config.variance_type, scheduler.config.prediction_type, clip_denoised
    )
    kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / np.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
    nll = mean_flat(nll) / np.log(2.0)
    return torch.where(timesteps == 0, nll, kl)


def diffusion_training_losses(
    model, scheduler: ADMScheduler, x_start, timesteps, noise=None, class_labels=None, low_res=None
) -> dict:
    """Per-sample ``loss``, ``mse`` and ``vb`` for a batch ``x_start`` at original-scale ``timesteps``.

    ``model`` is an ADM UNet (``low_res`` given: the super-res UNet). ``vb`` is zero for a fixed
    variance. Matches the original ``GaussianDiffusion.training_losses`` with loss type MSE."""
    if noise is None:
        noise = torch.randn_like(x_start)
    timesteps = torch.as_tensor(timesteps, device=x_start.device).reshape(-1)
    x_t = scheduler.train_process.q_sample(x_start, timesteps, noise)
    kwargs = {"class_labels": class_labels}
    if low_res is not None:
        kwargs["low_res"] = low_res
    model_output = model(x_t, timesteps, **kwargs).sample.float()
    channels = x_t.shape[1]
    learned = scheduler.config.variance_type == "learned_range"
    if learned:
        if model_output.shape[1] != 2 * channels:
            raise ValueError(
                f"learned variance needs {2 * channels} output channels, the model has {model_output.shape[1]}"
            )
        mean_out, var_values = torch.split(model_output, channels, dim=1)
        frozen = torch.cat([mean_out.detach(), var_values], dim=1)
        vb = vb_terms_bpd(scheduler, frozen, x_start, x_t, timesteps, clip_denoised=False)
    else:
        mean_out = model_output[:, :channels]
        vb = torch.zeros(x_start.shape[0], device=x_start.device)
    target = noise if scheduler.config.prediction_type == "epsilon" else x_start
    mse = mean_flat((target - mean_out) ** 2)
    return {"loss": mse + vb if learned else mse, "mse": mse, "vb": vb}


class UniformSampler:
    """t ~ U{0, …, T−1} with unit importance weights."""

    def __init__(self, num_timesteps: int):
        self.num_timesteps = num_timesteps

    def weights(self) -> np.ndarray:
        return np.ones(self.num_timesteps)

    def sample(self, batch_size: int, device=None, generator: torch.Generator | None = None):
        """Returns ``(timesteps, weights)``; weights 1/(T·p_t) keep the loss unbiased."""
        w = self.weights()
        p = torch.from_numpy(w / w.sum())
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        weights = 1.0 / (len(p) * p[t])
        return t.to(device), weights.float().to(device)

    def update_with_all_losses(self, timesteps, losses) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class LossSecondMomentResampler(UniformSampler):
    """Importance sampling p_t ∝ √E[L_t²] (Nichol & Dhariwal 2021, Eq. 18) from the last
    ``history_per_term`` losses of each t, mixed with ``uniform_prob`` of uniform; uniform until
    every t has a full history."""

    def __init__(self, num_timesteps: int, history_per_term: int = 10, uniform_prob: float = 0.001):
        super().__init__(num_timesteps)
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self._loss_history = np.zeros([num_timesteps, history_per_term], dtype=np.float64)
        self._loss_counts = np.zeros([num_timesteps], dtype=np.int64)

    def weights(self) -> np.ndarray:
        if not (self._loss_counts == self.history_per_term).all():
            return np.ones([self.num_timesteps], dtype=np.float64)
        w = np.sqrt(np.mean(self._loss_history**2, axis=-1))
        w /= np.sum(w)
        w *= 1 - self.uniform_prob
        w += self.uniform_prob / len(w)
        return w

    def update_with_all_losses(self, timesteps, losses) -> None:
        """Record losses of all processes (gather them first in multi-process training)."""
        for t, loss in zip(torch.as_tensor(timesteps).tolist(), torch.as_tensor(losses).tolist()):
            if self._loss_counts[t] == self.history_per_term:
                self._loss_history[t, :-1] = self._loss_history[t, 1:]
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1

    def state_dict(self) -> dict:
        return {"loss_history": self._loss_history.copy(), "loss_counts": self._loss_counts.copy()}

    def load_state_dict(self, state: dict) -> None:
        self._loss_history = np.asarray(state["loss_history"], dtype=np.float64).copy()
        self._loss_counts = np.asarray(state["loss_counts"], dtype=np.int64).copy()
