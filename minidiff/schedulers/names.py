"""The names people type for samplers (A1111 / k-diffusion, and minidiff's short CLI names) -> a scheduler.

A1111's web UI and k-diffusion name a sampler by its algorithm *and* its noise schedule ("DPM++ 2M Karras").
diffusers splits the two: the algorithm is a class, the schedule a config field. This table is diffusers'
own mapping (docs, "Schedulers" overview: "A1111/k-diffusion -> Diffusers"), written as data:

    "DPM++ 2M Karras"  ->  DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=True)

"LCM" and "TCD" are not on that page: they are the samplers of consistency-distilled models (LCM-LoRA, TCD-LoRA),
and an ordinary SD 1.5 gives blurs with them. Like diffusers, they are in no other scheduler's `compatibles`.

Two rows differ from that page, on purpose:
- "DPM++ SDE" is k-diffusion's `sample_dpmpp_sde` (a 2-stage SDE solver with Brownian-tree noise), which
  is what diffusers' `DPMSolverSDEScheduler` implements; the page lists `DPMSolverSinglestepScheduler`.
- "DPM++ 2S a" (ancestral 2S) has no exact diffusers class ("very similar to DPMSolverSinglestepScheduler");
  the closest is the singlestep solver's stochastic variant, `algorithm_type="sde-dpmsolver++"`, order 2.

One row is not a diffusion sampler: "Flow Euler" (`FlowMatchEulerDiscreteScheduler`) steps a *velocity* model on
x = (1 - sigma) x_0 + sigma eps (rectified-flow checkpoints, SD3, Flux). SD 1.5's eps-prediction UNet gives it nonsense,
so its `family` is "flow" and "all" in `compare --schedulers` leaves it out (as diffusers' `compatibles` does).

`order` is the method's order of accuracy (how the error falls with the step size h: error ~ h^order, for
the ODE solvers), not diffusers' `scheduler.order` (model calls per step). Stochastic samplers converge to
the right *distribution*, not to one ODE solution: their order column is the weak order (1).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

from minidiff.schedulers.base import SchedulerMixin
from minidiff.schedulers.ddim import DDIMScheduler
from minidiff.schedulers.ddpm import DDPMScheduler
from minidiff.schedulers.deis_multistep import DEISMultistepScheduler
from minidiff.schedulers.dpm_solver_multistep import DPMSolverMultistepScheduler
from minidiff.schedulers.dpm_solver_sde import DPMSolverSDEScheduler
from minidiff.schedulers.dpm_solver_singlestep import DPMSolverSinglestepScheduler
from minidiff.schedulers.euler import EulerDiscreteScheduler
from minidiff.schedulers.euler_ancestral import EulerAncestralDiscreteScheduler
from minidiff.schedulers.flow_match_euler import FlowMatchEulerDiscreteScheduler
from minidiff.schedulers.heun import HeunDiscreteScheduler
from minidiff.schedulers.kdpm2 import KDPM2DiscreteScheduler
from minidiff.schedulers.kdpm2_ancestral import KDPM2AncestralDiscreteScheduler
from minidiff.schedulers.lcm import LCMScheduler
from minidiff.schedulers.lms import LMSDiscreteScheduler
from minidiff.schedulers.pndm import PNDMScheduler
from minidiff.schedulers.tcd import TCDScheduler
from minidiff.schedulers.unipc import UniPCMultistepScheduler


@dataclass(frozen=True)
class SamplerName:
    """One row of the table: a name (and its aliases), the class it means, and the config fields it sets."""

    name: str
    scheduler_class: type[SchedulerMixin]
    overrides: dict = field(default_factory=dict)
    stochastic: bool = False
    order: int = 1
    description: str = ""
    aliases: tuple[str, ...] = ()
    family: str = "diffusion"  # "diffusion": SD 1.5's eps/v models; "flow": velocity models (flow matching)

    def from_config(self, config: dict) -> SchedulerMixin:
        """The scheduler this name means, built from another scheduler's config (the tutorial's swap)."""
        return self.scheduler_class.from_config(config, **self.overrides)


KARRAS = {"use_karras_sigmas": True}
SDE = {"algorithm_type": "sde-dpmsolver++"}

SAMPLER_NAMES = [
    SamplerName("PNDM", PNDMScheduler, {}, False, 4, "pseudo linear multistep (PLMS); SD 1.5's default", ("PLMS",)),
    SamplerName("DDIM", DDIMScheduler, {}, False, 1, "denoising diffusion implicit models; eta=0 is deterministic"),
    SamplerName("DDPM", DDPMScheduler, {}, True, 1, "the original ancestral sampler; needs many steps"),
    SamplerName("LMS", LMSDiscreteScheduler, {}, False, 4, "linear multistep in sigma, up to 4th order (k-diffusion sample_lms)"),
    SamplerName("LMS Karras", LMSDiscreteScheduler, KARRAS, False, 4, "LMS on Karras et al.'s sigma schedule (rho = 7)"),
    SamplerName("Euler", EulerDiscreteScheduler, {}, False, 1, "Euler's method on the probability-flow ODE (sample_euler)"),
    SamplerName("Euler a", EulerAncestralDiscreteScheduler, {}, True, 1, "Euler step plus fresh noise each step", ("euler_a",)),
    SamplerName("DPM++ 2M", DPMSolverMultistepScheduler, {}, False, 2, "DPM-Solver++ 2M: second-order multistep", ("dpm",)),
    SamplerName("DPM++ 2M Karras", DPMSolverMultistepScheduler, KARRAS, False, 2, "DPM++ 2M on Karras sigmas"),
    SamplerName("DPM++ 2M SDE", DPMSolverMultistepScheduler, SDE, True, 1, "SDE-DPM-Solver++ 2M (sample_dpmpp_2m_sde)"),
    SamplerName("DPM++ 2M SDE Karras", DPMSolverMultistepScheduler, {**SDE, **KARRAS}, True, 1, "DPM++ 2M SDE on Karras sigmas"),
    SamplerName("Heun", HeunDiscreteScheduler, {}, False, 2, "Heun's 2nd-order method (Karras et al. Alg. 1): two model calls a step"),
    SamplerName("DPM2", KDPM2DiscreteScheduler, {}, False, 2, "DPM-Solver-2 in sigma (sample_dpm_2): two model calls a step"),
    SamplerName("DPM2 Karras", KDPM2DiscreteScheduler, KARRAS, False, 2, "DPM2 on Karras sigmas"),
    SamplerName("DPM2 a", KDPM2AncestralDiscreteScheduler, {}, True, 1, "ancestral DPM-Solver-2 (sample_dpm_2_ancestral)"),
    SamplerName("DPM2 a Karras", KDPM2AncestralDiscreteScheduler, KARRAS, True, 1, "DPM2 a on Karras sigmas"),
    SamplerName("DPM++ SDE", DPMSolverSDEScheduler, {}, True, 1, "SDE-DPM-Solver++ 2S with Brownian-tree noise (sample_dpmpp_sde)"),
    SamplerName("DPM++ SDE Karras", DPMSolverSDEScheduler, KARRAS, True, 1, "DPM++ SDE on Karras sigmas"),
    SamplerName("UniPC", UniPCMultistepScheduler, {}, False, 3, "unified predictor-corrector (UniP-2 + UniC: order 3), good at 10-20 steps"),
    SamplerName("DPM++ 2S", DPMSolverSinglestepScheduler, {}, False, 2, "DPM-Solver++(2S): second-order singlestep (Lu et al. 2022b, Alg. 1)"),
    SamplerName("DPM++ 2S a", DPMSolverSinglestepScheduler, SDE, True, 1, "closest to A1111's ancestral 2S: SDE-DPM-Solver++ 2S"),
    SamplerName("DPM++ 2S a Karras", DPMSolverSinglestepScheduler, {**SDE, **KARRAS}, True, 1, "DPM++ 2S a on Karras sigmas"),
    SamplerName("DEIS", DEISMultistepScheduler, {}, False, 2, "exponential integrator, Adams-Bashforth in log rho (AB-DEIS)"),
    SamplerName("Flow Euler", FlowMatchEulerDiscreteScheduler, {}, False, 1,
                "Euler on the flow-matching ODE; for velocity models (rectified flow, SD3), not SD 1.5",
                ("flow", "flow_match_euler"), family="flow"),
    # Few-step samplers: only for consistency-distilled models (LCM-LoRA, LCM Dreamshaper, TCD-LoRA), 2-8 steps.
    SamplerName("LCM", LCMScheduler, {}, True, 1, "latent consistency: predict x0, re-noise; for LCM models and LCM-LoRA (4 steps)",
                family="consistency"),
    SamplerName("TCD", TCDScheduler, {}, True, 1, "trajectory consistency: ODE jump to s, noise up to t_prev (gamma = eta)",
                family="consistency"),
]


def _key(name: str) -> str:
    """'DPM++ 2M Karras', 'dpm++_2m_karras' and 'dpm++-2m-karras' are one name."""
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


def sampler_names() -> list[str]:
    return [row.name for row in SAMPLER_NAMES]


def find_sampler(name: str) -> SamplerName:
    """The row for `name` or an alias (case, spaces, '_' and '-' ignored); a class name such as
    'HeunDiscreteScheduler' means that class with its own defaults."""
    wanted = _key(name)
    for row in SAMPLER_NAMES:
        if wanted in {_key(row.name), *map(_key, row.aliases)}:
            return row
    for row in SAMPLER_NAMES:
        if not row.overrides and _key(row.scheduler_class.__name__) == wanted:
            return row
    close = difflib.get_close_matches(name, sampler_names(), n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    raise ValueError(f"unknown scheduler {name!r}.{hint} Choose from: {', '.join(sampler_names())} (or a class name)")
