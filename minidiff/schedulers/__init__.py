"""Schedulers: one algorithm per file, each readable next to its paper. Shared pieces: base.py (the mixins), schedules.py
(the pure schedule functions), exponential_integrator.py, two_model_calls.py, parameterization.py, update_rules.py."""

from minidiff.schedulers.base import SchedulerMixin, SchedulerOutput
from minidiff.schedulers.ddim import DDIMScheduler
from minidiff.schedulers.ddpm import DDPMScheduler
from minidiff.schedulers.pndm import PNDMScheduler
from minidiff.schedulers.euler import EulerDiscreteScheduler
from minidiff.schedulers.euler_ancestral import EulerAncestralDiscreteScheduler
from minidiff.schedulers.lms import LMSDiscreteScheduler
from minidiff.schedulers.dpm_solver_multistep import DPMSolverMultistepScheduler
from minidiff.schedulers.dpm_solver_sde import DPMSolverSDEScheduler
from minidiff.schedulers.heun import HeunDiscreteScheduler
from minidiff.schedulers.kdpm2 import KDPM2DiscreteScheduler
from minidiff.schedulers.kdpm2_ancestral import KDPM2AncestralDiscreteScheduler
from minidiff.schedulers.unipc import UniPCMultistepScheduler
from minidiff.schedulers.dpm_solver_singlestep import DPMSolverSinglestepScheduler
from minidiff.schedulers.deis_multistep import DEISMultistepScheduler
from minidiff.schedulers.flow_match_euler import FlowMatchEulerDiscreteScheduler
from minidiff.schedulers.lcm import LCMScheduler, LCMSchedulerOutput
from minidiff.schedulers.tcd import TCDScheduler, TCDSchedulerOutput

__all__ = ["SchedulerMixin", "SchedulerOutput", "DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "LMSDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "DPMSolverSinglestepScheduler", "DEISMultistepScheduler",
           "DPMSolverSDEScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
           "FlowMatchEulerDiscreteScheduler",
           "LCMScheduler", "LCMSchedulerOutput", "TCDScheduler", "TCDSchedulerOutput"]
