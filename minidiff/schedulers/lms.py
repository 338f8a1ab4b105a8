"""Linear multistep (LMS): the Adams-Bashforth idea on the probability-flow ODE, in sigma.

Source: k-diffusion's `sample_lms` (Katherine Crowson), after Karras et al. 2022 (arXiv 2206.00364),
whose ODE it integrates; the multistep method itself is the classical Adams-Bashforth family with
non-uniform steps (Hairer, Norsett & Wanner, "Solving ODEs I", §III.1).

With x = x_0 + sigma eps (sigma = sqrt((1 - alpha_bar_t) / alpha_bar_t), the VE noise level of `parameterization.py`), the ODE is
dx/dsigma = d(x, sigma) = (x - x0_pred) / sigma (Karras eq. 3). LMS keeps the last derivatives
d_i, d_{i-1}, ..., d_{i-q+1} and steps

    x_{i+1} = x_i + sum_{j=0}^{q-1} c_j d_{i-j}

    c_j = integral from sigma_i to sigma_{i+1} of  prod_{k != j} (tau - sigma_{i-k}) / (sigma_{i-j} - sigma_{i-k})  dtau

i.e. d is replaced by the polynomial through the q stored points (sigma_{i-k}, d_{i-k}) (Lagrange form)
and that polynomial is integrated over the step. q = min(step_index + 1, order), order = 4 by default,
so the first step is plain Euler. The integrand is a polynomial of degree q - 1 <= 3, which minidiff
integrates exactly (diffusers uses scipy.integrate.quad). `step` calls `update_rules.to_d`, `lms_coefficients`
and `lms_step`.

Config fields (diffusers' names and defaults):
- num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas: the training schedule alpha_bar_t.
- prediction_type: "epsilon": x0 = x - sigma eps; "v_prediction": x0 = x / (sigma^2+1) - v sigma / sqrt(sigma^2+1);
  "sample": the model predicts x0.
- timestep_spacing ("linspace", "leading", "trailing") and steps_offset: which training timesteps to
  visit; sigma at a fractional timestep is interpolated linearly in sigma.
- use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas (at most one): replace the N sigmas by
  the Karras rho = 7 ramp, a ramp even in log-sigma, or Beta(0.6, 0.6) quantiles, between the ends
  of the spaced schedule; timesteps then come from `sigma_to_t`.
"""

from __future__ import annotations

import numpy as np
import torch

from minidiff.configuration import register_to_config
from minidiff.schedulers.base import SigmaSchedulerMixin, check_num_inference_steps
from minidiff.schedulers.parameterization import to_x0_ve
from minidiff.schedulers.schedules import spaced_sigmas
from minidiff.schedulers.update_rules import lagrange_basis_integral, lms_coefficients, lms_step, to_d  # noqa: F401


class LMSDiscreteScheduler(SigmaSchedulerMixin):
    """Linear multistep in sigma: integrate the polynomial through the last `order` derivatives."""

    order = 1  # model evaluations per step (the multistep order is `step(..., order=4)`)
    requires_set_timesteps = False  # steps on the training schedule (T-1, ..., 0) until set_timesteps

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ):
        self._check_common_config()
        self.set_training_sigmas(beta_schedule, beta_start, beta_end, num_train_timesteps, trained_betas)

        self.use_karras_sigmas = use_karras_sigmas  # a plain attribute as in diffusers (no deprecation warning)
        # The plain schedule: every training timestep, noisiest first, then sigma = 0 (replaced just below).
        self.num_inference_steps = None
        self.sigmas = torch.cat([torch.from_numpy(self.train_sigmas).flip(0), torch.zeros(1)])
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.float32)
        self.derivatives: list[torch.Tensor] = []  # d_{i-q+1}, ..., d_i: the newest last
        self.is_scale_input_called = False
        self._step_index = None
        self._begin_index = None
        # As diffusers, a new LMS is set for all T training timesteps, so `step` works before set_timesteps (with
        # use_karras_sigmas etc., their T noise levels). A T-step schedule that repeats a noise level ("leading"
        # with steps_offset=1) is refused by set_timesteps: that one keeps the plain schedule above until then.
        try:
            self.set_timesteps(num_train_timesteps)
        except ValueError:
            self.num_inference_steps = None

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """The N timesteps to visit and their sigmas (interpolated, or Karras/exponential/beta), then sigma = 0.
        Clears the stored derivatives."""
        check_num_inference_steps(num_inference_steps, self.config.num_train_timesteps)
        self.num_inference_steps = num_inference_steps
        timesteps, sigmas = spaced_sigmas(self.config, self.train_sigmas, self.log_train_sigmas, num_inference_steps,
                                          self.config.num_train_timesteps, karras_takes_config_bounds=False)
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)  # (N+1,)
        repeated = np.flatnonzero(sigmas[:-1] == sigmas[1:])
        if len(repeated):
            i = repeated[0]
            raise ValueError(
                f"LMS needs distinct noise levels, but timesteps {float(timesteps[i])} and {float(timesteps[i + 1])} "
                f"both have sigma {float(sigmas[i])} (timesteps above num_train_timesteps - 1 are clamped: 'leading' spacing "
                "with steps_offset=1 and num_inference_steps=num_train_timesteps does this). The multistep polynomial "
                "through repeated points is undefined (diffusers returns inf/NaN); use fewer steps or steps_offset=0"
            )

        self.sigmas = torch.from_numpy(sigmas)  # kept on the CPU: read one value per step
        self.timesteps = torch.from_numpy(np.asarray(timesteps, dtype=np.float32)).to(device)
        self.derivatives = []
        self._step_index = None
        self._begin_index = None

    def get_lms_coefficient(self, order: int, t: int, current_order: int) -> float:
        """c_j for j = `current_order` of a q = `order` step at index i = `t` (`update_rules.lms_coefficients`): the
        integral from sigma_i to sigma_{i+1} of the Lagrange basis polynomial of node sigma_{i-j} over sigma_i .. sigma_{i-q+1}."""
        nodes = [float(self.sigmas[t - k]) for k in range(order)]
        return lagrange_basis_integral(nodes, current_order, float(self.sigmas[t]), float(self.sigmas[t + 1]))

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        order: int = 4,
        return_dict: bool = True,
        generator: torch.Generator | None = None,
    ):
        """One linear multistep step of order min(step_index + 1, order); see the module docstring.

        LMS is deterministic: `generator` is accepted for a uniform scheduler API and not used."""
        self._check_step_inputs(model_output, sample)  # an integer timestep is accepted, as diffusers does
        self._warn_if_input_not_scaled()
        if self.step_index is None:
            self._init_step_index(timestep)

        sigma = self.sigmas[self.step_index]
        x0_pred = to_x0_ve(model_output, sample, sigma, self.config.prediction_type)
        self.derivatives.append(to_d(sample, x0_pred, sigma))  # d_i = (x_i - D(x_i; sigma_i)) / sigma_i
        if len(self.derivatives) > order:
            self.derivatives.pop(0)

        # q = min(i + 1, order) counts steps since index 0, not stored derivatives: after
        # set_begin_index (img2img) fewer may be stored, and zip keeps as many terms as there are (as diffusers).
        q = min(self.step_index + 1, order)
        nodes = [float(self.sigmas[self.step_index - k]) for k in range(q)]  # sigma_i, sigma_{i-1}, ...
        coefficients = lms_coefficients(nodes, float(self.sigmas[self.step_index + 1]))  # c_0 .. c_{q-1}
        prev_sample = lms_step(sample, list(reversed(self.derivatives)), coefficients)

        self._step_index += 1
        return self._step_output(prev_sample, x0_pred, return_dict)
