"""The lab's exact inpainting conditional (minidiff/lab/inpainting.py) against brute force, and its samplers' basics."""

import math

import pytest
import torch

from minidiff.lab import accuracy
from minidiff.lab.gaussian_mixture import GaussianMixtureDenoiser
from minidiff.lab.inpainting import (
    blend_inpaint,
    distance_to_known,
    exact_conditional,
    guided_inpaint,
    measure,
    repaint_inpaint,
    sample_exact_conditional,
    seam_jump,
)


@pytest.fixture(scope="module")
def small_mixture():
    """Three components of 2x2 one-channel pictures (4 pixels), unequal weights, s = 0.3: overlapping."""
    means = torch.tensor([[0.0, 0.5, -0.5, 1.0], [0.3, 0.2, 0.8, -1.0], [-0.6, 0.4, 0.0, 0.2]], dtype=torch.float64)
    return GaussianMixtureDenoiser.from_components(means.reshape(3, 1, 2, 2), weights=torch.tensor([0.5, 0.3, 0.2]),
                                                   data_std=0.3)


def test_exact_conditional_equals_brute_force_integration(small_mixture):
    """Two pixels known, two unknown: p(k, y) and the moments of x_U | y by summing the full 4-D mixture density
    on a fine grid over the unknown pixels (no use of the isotropic shortcut)."""
    model = small_mixture
    known = torch.tensor([0.1, 0.4, 0.0, 0.0], dtype=torch.float64).reshape(1, 2, 2)
    mask = torch.tensor([[0, 0], [1, 1]])  # the first row is known (y), the second repainted
    grid = torch.linspace(-3.0, 3.0, 601, dtype=torch.float64)
    u1, u2 = torch.meshgrid(grid, grid, indexing="ij")
    points = torch.stack([torch.full_like(u1, 0.1), torch.full_like(u1, 0.4), u1, u2], dim=-1).reshape(-1, 4)  # (G, 4)
    s2, means, weights = 0.09, model.means.reshape(3, 4).double(), model.log_weights.double().exp()
    joint = torch.stack([
        weights[k] * torch.exp(-((points - means[k]) ** 2).sum(1) / (2 * s2)) / (2 * math.pi * s2) ** 2 for k in range(3)
    ])  # (K, G): pi_k N(x; mu_k, s^2 I)
    cell = (grid[1] - grid[0]) ** 2
    p_k_and_y = joint.sum(1) * cell
    density = joint.sum(0) / joint.sum()  # p(x_U | y) on the grid
    brute_mean = (density[:, None] * points[:, 2:]).sum(0)
    brute_var = (density[:, None] * (points[:, 2:] - brute_mean) ** 2).sum(0)

    exact = exact_conditional(model, known, mask)
    torch.testing.assert_close(exact.weights, p_k_and_y / p_k_and_y.sum(), atol=1e-9, rtol=0)
    torch.testing.assert_close(exact.mean.reshape(4)[2:], brute_mean, atol=1e-8, rtol=0)
    torch.testing.assert_close(exact.std.reshape(4)[2:] ** 2, brute_var, atol=1e-8, rtol=0)
    assert exact.std.reshape(4)[:2].abs().max() == 0 and torch.equal(exact.mean.reshape(4)[:2], known.reshape(4)[:2])
    assert 0.01 < exact.weights.min() and exact.weights.max() < 0.9  # a case where every picture is possible


def test_exact_samples_have_the_posterior_weights_within_sampling_error(small_mixture):
    model = small_mixture
    known = torch.tensor([0.1, 0.4, 0.0, 0.0], dtype=torch.float64).reshape(1, 2, 2)
    mask = torch.tensor([[0, 0], [1, 1]])
    exact = exact_conditional(model, known, mask)
    n = 20_000
    samples, components = sample_exact_conditional(model, known, mask, n, torch.Generator().manual_seed(0))
    frequencies = torch.bincount(components, minlength=3).double() / n
    standard_error = (exact.weights * (1 - exact.weights) / n).sqrt()
    assert bool(((frequencies - exact.weights).abs() < 4 * standard_error).all()), (frequencies, exact.weights)
    assert bool((samples[:, :, 0] == known[:, 0]).all())  # the known pixels are y, exactly
    unknown = samples[:, 0, 1]  # (n, 2)
    torch.testing.assert_close(unknown.mean(0), exact.mean[0, 1], atol=4 * float(exact.std.max()) / math.sqrt(n), rtol=0)
    torch.testing.assert_close(unknown.std(0), exact.std[0, 1], rtol=0.03, atol=0)
    wrong = exact_conditional(model, known * 0 + 1, mask).weights  # another y gives other weights: the check can fail
    assert (wrong - exact.weights).abs().max() > 10 * standard_error.max()


def test_samplers_keep_the_known_pixels_and_measure_scores_the_exact_samples_as_perfect():
    model = accuracy.prototype_mixture(8)
    known = model.means[4] + 0.1 * torch.randn(model.means[4].shape, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(8, 8)
    mask[:, 4:] = 1
    noise = torch.randn((16, 3, 8, 8), generator=torch.Generator().manual_seed(1))
    keep = ~mask.bool().expand(3, 8, 8)
    for samples in (blend_inpaint(model, known, mask, noise, 5), repaint_inpaint(model, known, mask, noise, 5, 2, torch.Generator()),
                    guided_inpaint(model, known, mask, noise, 5)):
        assert samples.shape == noise.shape
        torch.testing.assert_close(samples[:, keep], known[keep].expand(16, -1), atol=1e-6, rtol=0)
    exact_samples, _ = sample_exact_conditional(model, known, mask, 400, torch.Generator().manual_seed(2))
    report = measure(model, exact_samples, known, mask)
    assert report.total_variation < 0.02 and report.impossible == 0 and abs(report.spread_ratio - 1) < 0.1
    assert distance_to_known(mask)[0].tolist() == [0, 0, 0, 0, 1, 2, 3, 4]
    step = torch.zeros(1, 1, 8, 8)
    step[..., 4:] = 1.0  # a picture that jumps by 1 exactly at the mask's edge
    assert seam_jump(step, mask) == 1.0 and seam_jump(torch.ones(1, 1, 8, 8), mask) == 0.0


def test_bad_masks_are_refused():
    model = accuracy.prototype_mixture(8)
    with pytest.raises(ValueError, match="at least one of each"):
        exact_conditional(model, model.means[0], torch.zeros(8, 8))
    with pytest.raises(ValueError, match=r"mask must be \(H, W\)"):
        exact_conditional(model, model.means[0], torch.zeros(4, 4))


def test_the_conditional_model_samples_the_exact_conditional_without_a_blend():
    from minidiff.lab.inpainting import conditional_model
    from minidiff.schedulers import DDIMScheduler

    model = accuracy.prototype_mixture(8)
    known = model.means[4]
    mask = torch.zeros(8, 8)
    mask[:, 4:] = 1
    conditional = conditional_model(model, known, mask)
    exact = exact_conditional(model, known, mask)
    torch.testing.assert_close(conditional.log_weights.double().exp(), exact.weights, atol=1e-6, rtol=0)
    noise = torch.randn((64, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    _, samples = accuracy.run_scheduler(DDIMScheduler.from_config(accuracy.SD15_SCHEDULER_CONFIG), conditional, noise, 20)
    assert measure(model, samples, known, mask).impossible == 0
