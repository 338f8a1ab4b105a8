"""The lab's flow-matching half: the exact velocity of the mixture, the flow ODE, and Euler on it."""

from __future__ import annotations

import torch

from minidiff import FlowMatchEulerDiscreteScheduler
from minidiff.lab import accuracy
from minidiff.lab.gaussian_mixture import ExactVelocityModel


def test_flow_ode_is_the_probability_flow_ode_after_the_change_of_variables():
    """x_flow = x_VE / (1 + sigma_VE) at s = sigma_VE / (1 + sigma_VE): both reference solvers, one path."""
    model = accuracy.mixture_2d(torch.float64)
    x_flow = torch.randn(16, 2, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s_from, s_to = 0.9, 0.2
    sigma_from, sigma_to = s_from / (1 - s_from), s_to / (1 - s_to)
    flow_end = accuracy.flow_ode(model, x_flow, s_from, s_to)
    ve_end = accuracy.probability_flow_ode(model, x_flow * (1 + sigma_from), sigma_from, sigma_to)
    torch.testing.assert_close(flow_end, ve_end / (1 + sigma_to), rtol=0, atol=1e-8)


def test_velocity_is_eps_minus_x0_of_the_denoiser():
    """u(x, s) = E[eps | x] - E[x_0 | x], with the denoiser's posterior at x = (1 - s) x_0 + s eps."""
    model = accuracy.mixture_2d(torch.float64)
    x = torch.randn(8, 2, 1, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    s = 0.37
    posterior = model.posterior(x, 1 - s, s)
    torch.testing.assert_close(model.flow_velocity(x, s).reshape(8, 2), posterior.eps - posterior.x0)
    served = ExactVelocityModel(model)(x, torch.tensor(370.0)).sample
    torch.testing.assert_close(served, model.flow_velocity(x, s))


def test_one_euler_step_from_pure_noise_lands_on_the_data_mean():
    """At sigma = 1, x = eps carries no information about x_0, so u = x - E[x_0] and one step gives E[x_0]."""
    model = accuracy.mixture_2d(torch.float64)
    noise = torch.randn(32, 2, 1, 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    _, final = accuracy.run_scheduler(FlowMatchEulerDiscreteScheduler(), model, noise, 1)
    weights = torch.tensor(accuracy.MIXTURE_2D_WEIGHTS, dtype=torch.float64)
    mean = (weights[:, None] * torch.tensor(accuracy.MIXTURE_2D_MEANS, dtype=torch.float64)).sum(0)
    torch.testing.assert_close(final.reshape(32, 2), mean.expand(32, 2), rtol=0, atol=1e-5)


def test_flow_euler_converges_to_the_flow_ode_reference():
    model = accuracy.mixture_2d(torch.float64)
    noise = torch.randn(16, 2, 1, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    result = accuracy.measure_convergence(accuracy.FLOW_SETUPS[0], model, noise, (10, 20, 40), cache={})
    assert result.errors[2] < result.errors[1] < result.errors[0]
    assert 0.85 < result.order < 1.15  # Euler: first order


def test_the_flow_rows_are_the_same_with_diffusers_classes():
    diffusers = __import__("pytest").importorskip("diffusers")
    model = accuracy.mixture_2d(torch.float64)
    noise = torch.randn(8, 2, 1, 1, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for setup in accuracy.FLOW_SETUPS:
        ours = accuracy.measure_convergence(setup, model, noise, (3, 7), cache={})
        theirs = accuracy.measure_convergence(setup, model, noise, (3, 7), library=diffusers, cache={})
        assert ours.errors == theirs.errors, setup.label
