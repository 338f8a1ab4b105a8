"""The exact denoiser of a Gaussian mixture: what a perfectly trained diffusion model would predict.

When the data is a mixture of K isotropic Gaussians,

    p(x_0) = sum_k pi_k N(x_0; mu_k, s^2 I),

every noised marginal of x_t = a x_0 + b eps is again such a mixture (a Gaussian convolved with a Gaussian):

    p(x_t) = sum_k pi_k N(x_t; a mu_k, v I),        v = a^2 s^2 + b^2.

With a = sqrt(alpha_bar_t), b = sqrt(1 - alpha_bar_t) this is DDPM's forward process (Ho et al. 2020,
arXiv 2006.11239, eq. 4); with a = 1, b = sigma it is the "variance exploding" x = x_0 + sigma eps of
the sigma schedulers (Karras et al. 2022, arXiv 2206.00364). Bayes' rule on each component then
gives, in closed form,

    responsibilities   r_k(x_t)      = softmax_k( log pi_k - |x_t - a mu_k|^2 / (2 v) )      (log-sum-exp)
    score              grad log p    = -(x_t - a mu_bar) / v,        mu_bar = sum_k r_k mu_k
    noise prediction   eps*(x_t)     = E[eps | x_t] = -b grad log p(x_t)                        (DDPM eq. 11)
    posterior mean     E[x_0 | x_t]  = (x_t + b^2 grad log p) / a                               (Tweedie's formula)
                                     = mu_bar + (a s^2 / v) (x_t - a mu_bar)

With a = 1 - sigma, b = sigma it is the straight path of flow matching, x = (1 - sigma) x_0 + sigma eps (Lipman
et al. 2023, arXiv 2210.02747; Liu et al. 2023, arXiv 2209.03003), whose exact velocity field is

    velocity           u(x, sigma)   = E[eps - x_0 | x] = eps* - E[x_0 | x]                     (diffusers' sign)

(`GaussianMixtureDenoiser.flow_velocity`; `ExactVelocityModel` serves it behind the UNet's interface, at the
timestep t = 1000 sigma that `FlowMatchEulerDiscreteScheduler` passes).

`GaussianMixtureDenoiser` wraps these formulas behind the UNet's interface
(`model(sample, timestep, class_labels=None).sample`), so every scheduler can run on a "model" with
no training error at all: whatever error is left is the scheduler's own (see `minidiff.lab.accuracy`).

The noise level of a timestep comes from the same training schedule (`alphas_cumprod`) as the
scheduler's, so the model must be built with the scheduler's beta settings (`from_components(...,
scheduler_config=scheduler.config)`). A fractional timestep (Euler, LMS) is read the way those
schedulers make it: sigma_t is interpolated linearly between integer timesteps (as `np.interp`), and
the model input is the VP-scaled x_t = x / sqrt(sigma^2 + 1) that `scale_model_input` produced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from minidiff.configuration import register_to_config
from minidiff.models.modeling import ModelMixin
from minidiff.schedulers.base import PREDICTION_TYPES, check_choice, make_betas
from minidiff.utils.outputs import BaseOutput

# The keys of a scheduler config that define the training noise schedule (alphas_cumprod).
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "rescale_betas_zero_snr")

UNCONDITIONAL = -1  # the class label that selects the full mixture (the unconditional half of CFG)


@dataclass
class DenoiserOutput(BaseOutput):
    """What the model returns, named like diffusers' `UNet2DOutput`: `.sample` is the prediction."""

    sample: torch.Tensor


@dataclass
class MixturePosterior:
    """The closed-form answers at one noisy point x = a x_0 + b eps (shapes: B samples, K components, D dims)."""

    responsibilities: torch.Tensor  # (B, K)  r_k = p(component k | x)
    score: torch.Tensor  # (B, D)  grad_x log p(x)
    eps: torch.Tensor  # (B, D)  E[eps | x]
    x0: torch.Tensor  # (B, D)  E[x_0 | x]


def mixture_posterior(
    x: torch.Tensor,
    means: torch.Tensor,
    log_weights: torch.Tensor,
    data_std: float,
    scale: torch.Tensor,
    noise_std: torch.Tensor,
) -> MixturePosterior:
    """The exact posterior of p(x_0) = sum_k pi_k N(mu_k, s^2 I) given x = a x_0 + b eps (module docstring).

    x: (B, D); means: (K, D); log_weights: (B, K) or (K,), log pi_k (-inf drops a component);
    scale a and noise_std b: (B,). Computed in x's dtype; squared distances are taken from the
    differences (not |x|^2 - 2 x.mu + |mu|^2) so float32 keeps its precision far from the origin.
    """
    a, b = scale[:, None], noise_std[:, None]  # (B, 1)
    variance = a**2 * data_std**2 + b**2  # v, (B, 1)
    squared_distance = ((x[:, None, :] - a[:, :, None] * means[None]) ** 2).sum(-1)  # (B, K)
    logits = log_weights - squared_distance / (2 * variance)  # (B, K); the common -D/2 log(2 pi v) cancels
    responsibilities = torch.softmax(logits, dim=1)  # log-sum-exp inside
    mu_bar = responsibilities @ means  # (B, D)
    residual = x - a * mu_bar  # x - a mu_bar, (B, D)
    score = -residual / variance
    eps = -b * score
    x0 = mu_bar + (a * data_std**2 / variance) * residual
    return MixturePosterior(responsibilities, score, eps, x0)


def mixture_log_prob(
    x: torch.Tensor,
    means: torch.Tensor,
    log_weights: torch.Tensor,
    data_std: float,
    scale: torch.Tensor,
    noise_std: torch.Tensor,
) -> torch.Tensor:
    """log p(x) of the noised mixture sum_k pi_k N(x; a mu_k, v I), shape (B,). Differentiable (the score is its gradient)."""
    a, b = scale[:, None], noise_std[:, None]
    variance = a**2 * data_std**2 + b**2  # (B, 1)
    dims = x.shape[1]
    squared_distance = ((x[:, None, :] - a[:, :, None] * means[None]) ** 2).sum(-1)  # (B, K)
    log_normal = -squared_distance / (2 * variance) - 0.5 * dims * torch.log(2 * torch.pi * variance)  # (B, K)
    return torch.logsumexp(log_weights + log_normal, dim=1)


class GaussianMixtureDenoiser(ModelMixin):
    """A "UNet" whose predictions are exact: the Bayes-optimal denoiser of a Gaussian mixture.

    Build it with `from_components(means, weights, component_classes, data_std, ...)`; the means,
    log-weights and class of each component are its state dict, so `save_pretrained` /
    `from_pretrained` work as for any model. Call it as a UNet:

        noise_pred = model(x_t, t).sample                         # (B, C, H, W), per config.prediction_type
        noise_pred = model(x_t, t, class_labels=labels).sample    # restricted to each label's components

    A class label of -1 (`UNCONDITIONAL`) means the full mixture, so one batch can hold both halves of
    classifier-free guidance. Works in float32 and float64 (computes in the wider of the two dtypes).
    """

    @register_to_config
    def __init__(
        self,
        num_components: int = 8,
        in_channels: int = 3,
        sample_size: int = 32,
        data_std: float = 0.1,
        prediction_type: str = "epsilon",
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas=None,
        rescale_betas_zero_snr: bool = False,
    ):
        super().__init__()
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        if num_components < 1 or in_channels < 1 or sample_size < 1:
            raise ValueError(
                f"num_components, in_channels and sample_size must be positive, got "
                f"{num_components}, {in_channels}, {sample_size}"
            )
        if not data_std > 0:
            raise ValueError(f"data_std (the std s of each component) must be > 0, got {data_std}")
        shape = (num_components, in_channels, sample_size, sample_size)
        self.register_buffer("means", torch.zeros(shape))  # mu_k, (K, C, H, W)
        self.register_buffer("log_weights", torch.full((num_components,), -math.log(num_components)))
        self.register_buffer("component_classes", torch.arange(num_components))  # class label of each component
        with torch.device("cpu"):  # the schedule is a constant, also when the module is built on the meta device
            betas = make_betas(beta_schedule, beta_start, beta_end, num_train_timesteps, trained_betas, rescale_betas_zero_snr)
            alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # float32, exactly as the schedulers compute it
            if rescale_betas_zero_snr:  # alpha_bar_T = 0 would make sigma_T infinite; as Euler and DPM-Solver do:
                alphas_cumprod[-1] = 2**-24
            # sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) at integer t, float64 (not a buffer: derived).
            self.train_sigmas = ((1 - alphas_cumprod.double()) / alphas_cumprod.double()).sqrt()
        self.alphas_cumprod = alphas_cumprod

    @classmethod
    def from_components(
        cls,
        means: torch.Tensor,
        weights: torch.Tensor | None = None,
        component_classes: torch.Tensor | None = None,
        data_std: float = 0.1,
        prediction_type: str = "epsilon",
        scheduler_config: dict | None = None,
    ) -> "GaussianMixtureDenoiser":
        """The mixture sum_k weights_k N(means_k, data_std^2 I), in the dtype of `means`.

        means: (K, C, H, W). weights: (K,) positive (normalized here; default uniform).
        component_classes: (K,) integer class of each component (default: each its own class 0..K-1).
        scheduler_config: the scheduler's config, whose training schedule (betas) the model must share.
        """
        if means.ndim != 4 or means.shape[2] != means.shape[3]:
            raise ValueError(f"means must have shape (K, C, H, H) (square images), got {tuple(means.shape)}")
        K, C, H, _ = means.shape
        weights = torch.ones(K, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (K,) or not bool((weights > 0).all()):
            raise ValueError(f"weights must be {K} positive numbers (one per component), got {weights.tolist()}")
        classes = torch.arange(K) if component_classes is None else torch.as_tensor(component_classes)
        if classes.shape != (K,) or classes.is_floating_point() or bool((classes < 0).any()):
            raise ValueError(f"component_classes must be {K} non-negative integers (one per component), got {classes}")
        schedule = {key: scheduler_config[key] for key in SCHEDULE_KEYS if key in (scheduler_config or {})}
        model = cls(
            num_components=K, in_channels=C, sample_size=H, data_std=float(data_std), prediction_type=prediction_type, **schedule
        )
        model.means = means.detach().clone()
        model.log_weights = (weights / weights.sum()).log().to(means.dtype)
        model.component_classes = classes.long().clone()
        return model.eval()

    # ----- what a UNet has -----

    @property
    def dtype(self) -> torch.dtype:
        return self.means.dtype

    @property
    def device(self) -> torch.device:
        return self.means.device

    @property
    def num_classes(self) -> int:
        return int(self.component_classes.max()) + 1

    def forward(
        self, sample: torch.Tensor, timestep, class_labels: torch.Tensor | None = None, return_dict: bool = True
    ) -> DenoiserOutput | tuple:
        """The exact prediction at (x_t, t), per `config.prediction_type`:

        epsilon: eps*;   sample: E[x_0 | x_t];   v_prediction: v = a eps* - b E[x_0 | x_t]  (Salimans & Ho 2022)
        """
        self._check_sample(sample)
        scale, noise_std = self.vp_coefficients(timestep, len(sample))  # a, b: (B,) float64
        posterior = self.posterior(sample, scale, noise_std, class_labels)
        prediction_type = self.config.prediction_type
        if prediction_type == "epsilon":
            prediction = posterior.eps
        elif prediction_type == "sample":
            prediction = posterior.x0
        else:
            a, b = scale.to(posterior.eps)[:, None], noise_std.to(posterior.eps)[:, None]
            prediction = a * posterior.eps - b * posterior.x0
        prediction = prediction.reshape(sample.shape).to(sample.dtype)  # (B, C, H, W)
        return DenoiserOutput(prediction) if return_dict else (prediction,)

    # ----- the noise level of a timestep -----

    def sigma_at(self, timestep, batch_size: int) -> torch.Tensor:
        """sigma_t, (B,) float64: exact at integer t, linear in sigma between them (np.interp, as Euler/LMS)."""
        t = torch.as_tensor(timestep, dtype=torch.float64).cpu().flatten()
        if t.numel() == 1:
            t = t.expand(batch_size)
        if t.numel() != batch_size:
            raise ValueError(f"timestep must be one number or one per sample ({batch_size}), got {t.numel()} values")
        T = self.config.num_train_timesteps
        if not bool(((t >= 0) & (t <= T - 1)).all()):
            outside = t[(t < 0) | (t > T - 1)]
            raise ValueError(
                f"timestep must lie in [0, {T - 1}] (the training timesteps), got {outside[0].item()} "
                f"({len(outside)} of {len(t)} values outside); check the scheduler's num_train_timesteps and steps_offset"
            )
        low = t.floor().long().clamp(max=T - 2)
        w = t - low  # in [0, 1]
        return (1 - w) * self.train_sigmas[low] + w * self.train_sigmas[low + 1]

    def vp_coefficients(self, timestep, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) = (sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)) with alpha_bar_t = 1 / (sigma_t^2 + 1), (B,) float64."""
        sigma = self.sigma_at(timestep, batch_size)
        a = 1 / (sigma**2 + 1).sqrt()
        return a, sigma * a

    # ----- the closed forms, for the accuracy lab and the tests -----

    def posterior(
        self, sample: torch.Tensor, scale: torch.Tensor, noise_std: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> MixturePosterior:
        """`mixture_posterior` for images (B, C, H, W) at x = scale x_0 + noise_std eps; outputs are (B, C*H*W)."""
        dtype = torch.promote_types(sample.dtype, self.dtype)
        x = sample.reshape(len(sample), -1).to(dtype)  # (B, D)
        means = self.means.reshape(len(self.means), -1).to(dtype)  # (K, D)
        log_weights = self.class_log_weights(class_labels, len(sample)).to(dtype)  # (B, K)
        scale = torch.as_tensor(scale, dtype=dtype, device=x.device).expand(len(x))
        noise_std = torch.as_tensor(noise_std, dtype=dtype, device=x.device).expand(len(x))
        return mixture_posterior(x, means, log_weights, self.config.data_std, scale, noise_std)

    def denoise(self, sample: torch.Tensor, sigma, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """D(x, sigma) = E[x_0 | x_0 + sigma eps = x] (Karras et al. 2022, eq. 2 and 3), shaped like `sample`."""
        return self.posterior(sample, 1.0, sigma, class_labels).x0.reshape(sample.shape)

    def flow_velocity(self, sample: torch.Tensor, sigma, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """u(x, sigma) = E[eps - x_0 | x = (1 - sigma) x_0 + sigma eps], shaped like `sample` (in the wider dtype).

        The velocity of the flow-matching ODE dx/dsigma = u, finite on all of [0, 1]: at sigma = 1 (x = eps),
        u = x - E[x_0]; at sigma = 0 (x = x_0, independent of eps), u = -x."""
        sigma = torch.as_tensor(sigma, dtype=torch.promote_types(sample.dtype, self.dtype), device=sample.device)
        posterior = self.posterior(sample, 1 - sigma, sigma, class_labels)
        return (posterior.eps - posterior.x0).reshape(sample.shape)

    def log_prob(self, sample: torch.Tensor, scale, noise_std, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """log p(x) of the noised mixture at x = scale x_0 + noise_std eps, (B,). Its gradient is the score."""
        dtype = torch.promote_types(sample.dtype, self.dtype)
        x = sample.reshape(len(sample), -1).to(dtype)
        means = self.means.reshape(len(self.means), -1).to(dtype)
        log_weights = self.class_log_weights(class_labels, len(sample)).to(dtype)
        scale = torch.as_tensor(scale, dtype=dtype, device=x.device).expand(len(x))
        noise_std = torch.as_tensor(noise_std, dtype=dtype, device=x.device).expand(len(x))
        return mixture_log_prob(x, means, log_weights, self.config.data_std, scale, noise_std)

    def class_log_weights(self, class_labels: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        """log pi_k per sample, (B, K): the full mixture, or only the components of each sample's class (renormalized)."""
        log_weights = self.log_weights.expand(batch_size, -1)
        if class_labels is None:
            return log_weights
        labels = torch.as_tensor(class_labels, device=self.device).flatten()
        if labels.numel() == 1:
            labels = labels.expand(batch_size)
        if labels.shape != (batch_size,) or labels.is_floating_point():
            raise ValueError(f"class_labels must be one integer per sample ({batch_size}), got {class_labels!r}")
        known = set(self.component_classes.tolist()) | {UNCONDITIONAL}
        unknown = sorted(set(labels.tolist()) - known)
        if unknown:
            classes = sorted(known - {UNCONDITIONAL})
            raise ValueError(f"unknown class label(s) {unknown}; this mixture has classes {classes} (-1: unconditional)")
        in_class = (self.component_classes[None, :] == labels[:, None]) | (labels[:, None] == UNCONDITIONAL)  # (B, K)
        masked = log_weights.masked_fill(~in_class, float("-inf"))
        return masked - torch.logsumexp(masked, dim=1, keepdim=True)

    def sample_data(
        self, num_samples: int, generator: torch.Generator | None = None, class_labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw x_0 from the mixture (or each label's part of it): returns (x_0 (N, C, H, W), component index (N,))."""
        log_weights = self.class_log_weights(class_labels, num_samples)
        components = torch.multinomial(log_weights.double().exp().cpu(), 1, generator=generator).squeeze(1)  # (N,)
        noise = torch.randn((num_samples, *self.means.shape[1:]), generator=generator, dtype=self.dtype)
        return self.means.cpu()[components] + self.config.data_std * noise, components

    def _check_sample(self, sample: torch.Tensor) -> None:
        expected = (self.config.in_channels, self.config.sample_size, self.config.sample_size)
        if sample.ndim != 4 or tuple(sample.shape[1:]) != expected:
            raise ValueError(f"sample must have shape (B, {', '.join(map(str, expected))}), got {tuple(sample.shape)}")
        if not sample.is_floating_point():
            raise ValueError(f"sample must be a floating-point tensor, got {sample.dtype}")


class ExactVelocityModel(torch.nn.Module):
    """The exact flow-matching "model" of a mixture: `model(x, t).sample` is u(x, sigma) at sigma = t / T.

    `FlowMatchEulerDiscreteScheduler` tells the model t = num_train_timesteps * sigma; this turns it back and asks
    `denoiser.flow_velocity`. The mixture and its classes are the denoiser's; its noise schedule is not used.
    """

    def __init__(self, denoiser: GaussianMixtureDenoiser, num_train_timesteps: int = 1000):
        super().__init__()
        self.denoiser = denoiser
        self.num_train_timesteps = num_train_timesteps

    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser.dtype

    def forward(self, sample: torch.Tensor, timestep, class_labels: torch.Tensor | None = None,
                return_dict: bool = True) -> DenoiserOutput | tuple:
        self.denoiser._check_sample(sample)
        sigma = torch.as_tensor(timestep, dtype=torch.float64).cpu().flatten() / self.num_train_timesteps
        if sigma.numel() == 1:
            sigma = sigma.expand(len(sample))
        if sigma.numel() != len(sample) or not bool(((sigma >= 0) & (sigma <= 1)).all()):
            raise ValueError(
                f"timestep must be one number or one per sample ({len(sample)}) in [0, {self.num_train_timesteps}] "
                f"(t = {self.num_train_timesteps} sigma), got {timestep!r}"
            )
        velocity = self.denoiser.flow_velocity(sample, sigma.to(sample.device), class_labels).to(sample.dtype)
        return DenoiserOutput(velocity) if return_dict else (velocity,)
