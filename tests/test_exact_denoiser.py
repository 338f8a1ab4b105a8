"""The Gaussian-mixture denoiser is exact: checked against Monte Carlo, autograd and diffusers' sigma interpolation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from minidiff.models.gaussian_mixture import GaussianMixtureDenoiser
from minidiff.prototypes import PROTOTYPE_NAMES, draw_prototype, prototype_means, tensor_to_pil



SD15_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def small_mixture(dtype=torch.float64, data_std=0.3, prediction_type="epsilon", seed=0) -> GaussianMixtureDenoiser:
    """K=3 components in D = 2 x 1 x 1 = 2 dimensions, unequal weights, classes (0, 0, 1)."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(3, 2, 1, 1, generator=generator, dtype=dtype) * 1.5
    return GaussianMixtureDenoiser.from_components(
        means, weights=[0.5, 0.3, 0.2], component_classes=[0, 0, 1], data_std=data_std,
        prediction_type=prediction_type, scheduler_config=SD15_SCHEDULE,
    )


def torch_mixture(model: GaussianMixtureDenoiser, a: float, b: float) -> MixtureSameFamily:
    """The same noised marginal built from torch.distributions, an independent oracle for log p and its gradient."""
    means = model.means.reshape(len(model.means), -1).double()
    std = (a**2 * model.config.data_std**2 + b**2) ** 0.5
    components = Independent(Normal(a * means, std * torch.ones_like(means)), 1)
    return MixtureSameFamily(Categorical(logits=model.log_weights.double()), components)


@pytest.mark.parametrize("timestep", [50, 300, 700, 999])
def test_eps_matches_autograd_score_of_the_mixture_density(timestep):
    model = small_mixture()
    a, b = (value.item() for value in model.vp_coefficients(timestep, 1))
    x = torch.randn(16, 2, 1, 1, generator=torch.Generator().manual_seed(timestep), dtype=torch.float64) * 2
    x_flat = x.reshape(16, 2).clone().requires_grad_(True)
    torch_mixture(model, a, b).log_prob(x_flat).sum().backward()
    eps_from_score = -b * x_flat.grad  # eps* = -sqrt(1 - alpha_bar) grad log p(x_t)
    eps = model(x, timestep).sample.reshape(16, 2)
    torch.testing.assert_close(eps, eps_from_score, rtol=1e-10, atol=1e-12)  # float64: round-off only
    torch.testing.assert_close(model.log_prob(x, a, b), torch_mixture(model, a, b).log_prob(x.reshape(16, 2)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("timestep", [200, 600, 950])
def test_eps_matches_monte_carlo_posterior_mean_of_the_noise(timestep):
    """E[eps | x_t] by self-normalized importance sampling: x_0 from the prior, weighted by N(x_t; a x_0, b^2 I)."""
    model = small_mixture()
    a, b = (value.item() for value in model.vp_coefficients(timestep, 1))
    generator = torch.Generator().manual_seed(1)
    x0_true, _ = model.sample_data(4, generator)
    x_t = a * x0_true + b * torch.randn(x0_true.shape, generator=generator, dtype=torch.float64)  # (4, 2, 1, 1)
    x0, _ = model.sample_data(400_000, generator)  # proposals, (N, 2, 1, 1)
    x0 = x0.reshape(-1, 2)
    for point, expected in zip(x_t.reshape(4, 2), model(x_t, timestep).sample.reshape(4, 2)):
        eps = (point - a * x0) / b  # (N, 2)
        log_w = -((eps**2).sum(1)) / 2
        w = torch.softmax(log_w, 0)
        estimate = (w[:, None] * eps).sum(0)
        effective_samples = 1 / (w**2).sum()
        # standard error of a self-normalized estimate ~ std(eps | x_t) / sqrt(ESS); allow 5 of them
        tolerance = 5 * (w[:, None] * (eps - estimate) ** 2).sum(0).sqrt() / effective_samples.sqrt()
        assert effective_samples > 1000, f"too few effective samples ({effective_samples:.0f}) for a meaningful check"
        assert ((estimate - expected).abs() <= tolerance).all(), f"MC {estimate} vs exact {expected} (tol {tolerance})"


def test_posterior_mean_snaps_to_the_nearest_prototype_at_t0_as_s_goes_to_0():
    """E[x_0 | x_t] = mu_k + (a s^2 / v)(x_t - a mu_k) near component k: the error shrinks like s^2 / b^2 -> 0."""
    means = prototype_means(16, dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(means.shape, generator=generator, dtype=torch.float64)
    errors = []
    for data_std in (1e-2, 1e-3, 1e-4):
        model = GaussianMixtureDenoiser.from_components(means, data_std=data_std, prediction_type="sample")
        a, b = (value.item() for value in model.vp_coefficients(0, 1))
        x0 = model(a * means + b * noise, 0).sample  # every prototype, noised to t = 0
        errors.append((x0 - means).abs().max().item())
    # s = 1e-4: shrinkage factor a s^2 / v ~ 1.2e-5 times |b eps| <~ 0.15, so ~2e-6
    assert errors[-1] < 5e-6, errors
    assert errors[0] > errors[1] > errors[2], f"error must fall as s -> 0: {errors}"


def test_prediction_types_agree_with_each_other():
    """a x0 + b eps = x_t, and v = a eps - b x0 (Salimans & Ho 2022), at integer and fractional timesteps."""
    models = {kind: small_mixture(prediction_type=kind) for kind in ("epsilon", "sample", "v_prediction")}
    x = torch.randn(5, 2, 1, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    timesteps = torch.tensor([0.0, 10.5, 333.25, 800.0, 999.0], dtype=torch.float64)
    a, b = models["epsilon"].vp_coefficients(timesteps, 5)
    a, b = a[:, None, None, None], b[:, None, None, None]
    eps, x0, v = (models[kind](x, timesteps).sample for kind in ("epsilon", "sample", "v_prediction"))
    torch.testing.assert_close(a * x0 + b * eps, x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v, a * eps - b * x0, rtol=1e-12, atol=1e-12)


def test_fractional_timesteps_use_the_sigma_interpolation_of_euler_and_lms():
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler(**SD15_SCHEDULE)
    scheduler.set_timesteps(7)  # linspace: fractional timesteps such as 832.5
    model = small_mixture()
    sigmas = model.sigma_at(scheduler.timesteps, len(scheduler.timesteps))
    # diffusers interpolates in float64 numpy then stores float32 sigmas: compare at float32 precision
    torch.testing.assert_close(sigmas.float(), scheduler.sigmas[:-1], rtol=1e-6, atol=0)
    a, _ = model.vp_coefficients(scheduler.timesteps, len(scheduler.timesteps))
    torch.testing.assert_close(a, 1 / (sigmas**2 + 1).sqrt())  # alpha_bar = 1 / (sigma^2 + 1) behind scale_model_input
    integer = torch.arange(0, 1000, 37)
    torch.testing.assert_close(model.vp_coefficients(integer, len(integer))[0] ** 2, model.alphas_cumprod[integer].double(), rtol=1e-7, atol=0)


def test_zero_terminal_snr_schedule_stays_finite():
    """rescale_betas_zero_snr gives alpha_bar_999 = 0; the model uses 2^-24 there (as Euler/DPM-Solver), so x_999 ~ eps."""
    means = torch.randn(3, 2, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model = GaussianMixtureDenoiser.from_components(means, scheduler_config={**SD15_SCHEDULE, "rescale_betas_zero_snr": True})
    x = torch.randn(4, 2, 1, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    eps = model(x, torch.tensor([999.0, 998.5, 999.0, 0.0])).sample
    assert torch.isfinite(eps).all()
    torch.testing.assert_close(eps[0], x[0], rtol=0, atol=1e-3)  # eps* = x when alpha_bar -> 0 (a = 2^-12 here)


def test_class_labels_restrict_the_mixture_and_minus_one_is_unconditional():
    model = small_mixture()
    x = torch.randn(4, 2, 1, 1, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    only_class_0 = GaussianMixtureDenoiser.from_components(model.means[:2], weights=[0.5, 0.3], data_std=0.3, scheduler_config=SD15_SCHEDULE)
    torch.testing.assert_close(model(x, 400, class_labels=torch.zeros(4, dtype=torch.long)).sample, only_class_0(x, 400).sample)
    labels = torch.tensor([-1, 0, -1, 1])
    mixed = model(x, 400, class_labels=labels).sample
    torch.testing.assert_close(mixed[[0, 2]], model(x[[0, 2]], 400).sample)
    torch.testing.assert_close(mixed[3:], model(x[3:], 400, class_labels=torch.tensor([1])).sample)


def test_classifier_free_guidance_is_the_score_of_the_tilted_density():
    """eps_u + w (eps_c - eps_u) = -b grad[(1 - w) log p(x) + w log p(x | c)], computed with autograd."""
    model, w, t = small_mixture(), 3.0, 500
    a, b = (value.item() for value in model.vp_coefficients(t, 1))
    x = torch.randn(6, 2, 1, 1, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    eps_u, eps_c = model(torch.cat([x, x]), t, class_labels=torch.tensor([-1] * 6 + [1] * 6)).sample.chunk(2)
    guided = eps_u + w * (eps_c - eps_u)
    x_flat = x.reshape(6, 2).clone().requires_grad_(True)
    tilted = (1 - w) * model.log_prob(x_flat.reshape(6, 2, 1, 1), a, b) + w * model.log_prob(x_flat.reshape(6, 2, 1, 1), a, b, class_labels=1)
    tilted.sum().backward()
    torch.testing.assert_close(guided.reshape(6, 2), -b * x_flat.grad, rtol=1e-10, atol=1e-12)


def test_float32_matches_float64_and_stays_finite_far_from_the_data():
    model64 = GaussianMixtureDenoiser.from_components(prototype_means(16, dtype=torch.float64), data_std=0.05)
    model32 = GaussianMixtureDenoiser.from_components(prototype_means(16), data_std=0.05)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x[2] *= 1e3  # far from every component: the logits differ by ~1e9, softmax must not overflow
    for t in (0, 250, 999):
        out64, out32 = model64(x, t).sample, model32(x.float(), t).sample
        assert out32.dtype == torch.float32 and torch.isfinite(out32).all()
        # float32 error: ~1e-7 relative on |x|/b-sized values; the far sample has |x| ~ 1e3
        torch.testing.assert_close(out32.double(), out64, rtol=1e-4, atol=1e-4 * float(x.abs().max()))


def test_batched_equals_one_at_a_time_with_per_sample_timesteps():
    model = small_mixture()
    x = torch.randn(4, 2, 1, 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    timesteps = torch.tensor([3, 250.5, 600, 990])
    batched = model(x, timesteps).sample
    singles = torch.cat([model(x[i : i + 1], timesteps[i]).sample for i in range(4)])
    torch.testing.assert_close(batched, singles, rtol=0, atol=1e-15)


def test_sample_data_follows_the_weights():
    model = small_mixture()
    x0, components = model.sample_data(20_000, torch.Generator().manual_seed(0))
    frequencies = torch.bincount(components, minlength=3).double() / 20_000
    # binomial standard error sqrt(p(1-p)/N) <= 0.0036; allow 4 of them
    torch.testing.assert_close(frequencies, torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), rtol=0, atol=0.015)
    spread = (x0 - model.means[components]).std()
    assert abs(spread.item() - 0.3) < 0.01  # std of 40,000 normal draws: standard error 0.0011


def test_save_and_load_round_trip(tmp_path):
    model = small_mixture(prediction_type="v_prediction")
    model.save_pretrained(tmp_path)
    loaded = GaussianMixtureDenoiser.from_pretrained(tmp_path, torch_dtype=torch.float64)
    x = torch.randn(2, 2, 1, 1, dtype=torch.float64)
    torch.testing.assert_close(loaded(x, 123.5).sample, model(x, 123.5).sample)
    assert loaded.config.prediction_type == "v_prediction" and loaded.component_classes.tolist() == [0, 0, 1]


def test_unet_interface():
    model = GaussianMixtureDenoiser.from_components(prototype_means(16))
    assert (model.config.sample_size, model.config.in_channels, model.dtype, model.device.type) == (16, 3, torch.float32, "cpu")
    out = model(torch.randn(2, 3, 16, 16), torch.tensor(10), return_dict=False)
    assert isinstance(out, tuple) and out[0].shape == (2, 3, 16, 16)


def test_bad_inputs_raise_clear_errors():
    model = small_mixture()
    x = torch.zeros(2, 2, 1, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="sample must have shape"):
        model(torch.zeros(2, 3, 1, 1), 10)
    with pytest.raises(ValueError, match=r"timestep must lie in \[0, 999\]"):
        model(x, 1000)
    with pytest.raises(ValueError, match="one number or one per sample"):
        model(x, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="unknown class label"):
        model(x, 10, class_labels=torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="one integer per sample"):
        model(x, 10, class_labels=torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match="positive numbers"):
        GaussianMixtureDenoiser.from_components(torch.zeros(2, 1, 1, 1), weights=[1.0, 0.0])
    with pytest.raises(ValueError, match="data_std"):
        GaussianMixtureDenoiser.from_components(torch.zeros(2, 1, 1, 1), data_std=0.0)
    with pytest.raises(ValueError, match=r"shape \(K, C, H, H\)"):
        GaussianMixtureDenoiser.from_components(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="prediction_type"):
        GaussianMixtureDenoiser(prediction_type="score")
    with pytest.raises(ValueError, match="unknown prototype"):
        draw_prototype("dragon")


def test_prototypes_are_distinct_pictures_in_range():
    means = prototype_means(32)
    assert means.shape == (len(PROTOTYPE_NAMES), 3, 32, 32) and means.min() >= -1 and means.max() <= 1
    distances = torch.cdist(means.flatten(1), means.flatten(1))
    assert distances[~torch.eye(len(means), dtype=torch.bool)].min() > 5  # every pair differs visibly
    round_trip = prototype_means(32)[0]
    np.testing.assert_array_equal(np.asarray(tensor_to_pil(round_trip)), np.asarray(draw_prototype("circle", 32)))
