"""The trajectory pictures: exact probability-flow paths (minidiff.lab.trajectories) and their drawing
(minidiff.viz.trajectories), on a few 2-D points so that the test takes about a second."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from minidiff.lab import accuracy
from minidiff.lab.trajectories import exact_trajectory, scheduler_trajectory, visited_sigmas
from minidiff.viz.trajectories import trajectory_plot


@pytest.fixture(scope="module")
def model():
    return accuracy.mixture_2d(torch.float64)


@pytest.fixture(scope="module")
def noise():
    return torch.randn(3, 2, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_visited_sigmas_has_one_level_per_step_and_the_start():
    euler = accuracy.make_scheduler(accuracy.SchedulerSetup("Euler", "EulerDiscreteScheduler"))
    heun = accuracy.make_scheduler(accuracy.SchedulerSetup("Heun", "HeunDiscreteScheduler"))
    ddim = accuracy.make_scheduler(accuracy.SchedulerSetup("DDIM", "DDIMScheduler"))
    for scheduler in (euler, heun, ddim):
        scheduler.set_timesteps(5)
    assert visited_sigmas(euler) == [float(s) for s in euler.sigmas]
    assert visited_sigmas(heun) == visited_sigmas(euler)  # Heun's repeated inner levels counted once
    alpha_bar_801 = float(ddim.alphas_cumprod.double()[801])
    assert len(visited_sigmas(ddim)) == 6 and math.isclose(visited_sigmas(ddim)[0], math.sqrt((1 - alpha_bar_801) / alpha_bar_801))
    pndm = accuracy.make_scheduler(accuracy.SchedulerSetup("PNDM", "PNDMScheduler"))
    pndm.set_timesteps(5)
    with pytest.raises(ValueError, match="PNDMScheduler"):
        visited_sigmas(pndm)


def test_scheduler_trajectory_ends_where_the_loop_ends(model, noise):
    for setup in (accuracy.SchedulerSetup("Heun", "HeunDiscreteScheduler"),
                  accuracy.SchedulerSetup("DDIM", "DDIMScheduler", step_kwargs={"eta": 0.0})):
        steps = scheduler_trajectory(accuracy.make_scheduler(setup), model, noise, 4, setup.step_kwargs)
        _, final = accuracy.run_scheduler(accuracy.make_scheduler(setup), model, noise, 4, setup.step_kwargs)
        assert steps.points.shape == (5, 3, 2, 1, 1) and len(steps.sigmas) == 5
        scale = 1.0 if setup.label == "DDIM" else math.sqrt(steps.sigmas[-1] ** 2 + 1)  # VE samples are rescaled
        torch.testing.assert_close(steps.points[-1] * scale, final, rtol=0, atol=1e-12)
        torch.testing.assert_close(steps.points[0], noise * (1 if setup.label == "DDIM" else 14.6146 / math.sqrt(14.6146**2 + 1)),
                                   rtol=1e-4, atol=0)


def test_flow_euler_points_are_ddims_after_the_change_of_variables(model, noise):
    ddim_setup = accuracy.SchedulerSetup("DDIM", "DDIMScheduler", step_kwargs={"eta": 0.0})
    ddim = scheduler_trajectory(accuracy.make_scheduler(ddim_setup), model, noise, 3, ddim_setup.step_kwargs)
    sigma = ddim.sigmas[0]
    flow_start = noise * math.sqrt(sigma**2 + 1) / (1 + sigma)  # x_t / (alpha + sigma_t)
    flow = accuracy.make_scheduler(accuracy.SchedulerSetup("Flow Euler", "FlowMatchEulerDiscreteScheduler"))
    steps = scheduler_trajectory(flow, model, flow_start, None, sigmas=[s / (1 + s) for s in ddim.sigmas[:-1]])
    assert steps.sigmas[-1] == 0 and len(steps.sigmas) == 4
    torch.testing.assert_close(steps.points[:-1], ddim.points[:-1], rtol=0, atol=1e-5)  # the same steps
    flow.set_timesteps(4)  # from pure noise: s = 1 is VE sigma infinity, where x_flow = x_t
    assert visited_sigmas(flow)[0] == math.inf and visited_sigmas(flow)[-1] == 0
    with pytest.raises(ValueError, match="pure noise"):
        exact_trajectory(model, noise, visited_sigmas(flow))


def test_exact_trajectory_matches_one_solve_of_the_ode(model, noise):
    sigmas = [14.6, 3.0, 0.5, 0.0]
    start = noise / math.sqrt(14.6**2 + 1) * 14.6  # VP frame of noise * 14.6
    path = exact_trajectory(model, start, sigmas, num_points=10)
    assert path.sigmas[0] == 14.6 and path.sigmas[-1] == 0.0 and len(path.sigmas) == len(path.points)
    assert list(path.sigmas) == sorted(path.sigmas, reverse=True)
    direct = accuracy.probability_flow_ode(model, start * math.sqrt(14.6**2 + 1), 14.6, 0.5)
    torch.testing.assert_close(path.at(0.5), direct / math.sqrt(0.5**2 + 1), rtol=0, atol=1e-6)
    with pytest.raises(KeyError):
        path.at(7.123)


def test_trajectory_plot_draws_one_panel_per_entry(tmp_path, noise):
    exact = torch.stack([noise * (1 - k / 9) for k in range(10)])  # (10, 3, 2, 1, 1): straight lines to 0
    steps = exact[::3]
    out = trajectory_plot({"a": (exact, steps), "b": (exact, steps), "c": (exact, steps)}, tmp_path / "t.png",
                          columns=2, marks=torch.zeros(1, 2), colors={"a": (255, 0, 0)})
    with Image.open(out) as picture:
        assert picture.size == (2 * (260 + 12) + 12, 2 * (260 + 24 + 12) + 12)
        assert (255, 0, 0) in {color for _, color in picture.convert("RGB").getcolors(1 << 20)}
    with pytest.raises(ValueError, match="at least one panel"):
        trajectory_plot({}, tmp_path / "none.png")
    with pytest.raises(ValueError, match="expected"):
        trajectory_plot({"bad": (torch.zeros(4, 3, 3), steps)}, tmp_path / "bad.png")
