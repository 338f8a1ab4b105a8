"""Brownian motion on an interval, drawn lazily by Brownian bridges on a binary tree of sub-intervals.

Paper: Kidger, Foster, Li, Lyons 2021, "Efficient and Accurate Gradients for Neural SDEs",
arXiv 2105.13493: the Brownian Interval (its Figure 3, a binary tree of intervals). This is the
noise source of SDE samplers such as DPM-Solver++ SDE (`dpm_solver_sde.py`): one fixed Brownian
path W on [t0, t1], of which any increment W(tb) - W(ta) can be asked for, in any order, any number
of times, and always comes out the same. Two facts make that possible without storing the path:

1. The Brownian bridge. Given the increment W_{s,t} = W(t) - W(s) over [s, t] and a point s < u < t,

       W_{s,u} | W_{s,t}  ~  N( (u - s)/(t - s) W_{s,t},  (u - s)(t - u)/(t - s) I ),   W_{u,t} = W_{s,t} - W_{s,u}

   so an interval's increment splits into its two halves' increments with one fresh normal draw.

2. Splittable seeds. The normal draw that splits a node of the tree is seeded from the node's place
   in the tree (its depth and index), not from a running random state. Recomputing a node (after the
   cache forgot it, or in another process) draws the very same numbers.

The tree used here is the dyadic one ("halfway tree"): the root is [t0, t1] and every node [s, t]
splits at its midpoint (s + t)/2. Times are rounded to `tol` (1e-6), so the tree bottoms out. A query
[ta, tb] is cut into the largest tree nodes that tile it (left to right), the increments of those
nodes come down from the root by bridges, and their sum is the answer:

    root W_{t0,t1} = sqrt(t1 - t0) z_root
    node [s, t], midpoint u:  W_{s,u} = (u - s) W_{s,t} / (t - s) + sqrt((u - s)(t - u)/(t - s)) z_node,
                              W_{u,t} = W_{s,t} - W_{s,u}

With the dyadic tree the path depends on the seed only, not on which queries came before (the paper's
tree splits at the query points instead, which is faster but order-dependent).

Numbers. diffusers' DPMSolverSDEScheduler draws this noise through torchsde's BrownianInterval
(t0 = sigma_min, t1 = sigma_max, tol = 1e-6, pool_size = 24, halfway_tree = True). To give the same
numbers on the same seed, minidiff derives the seeds and draws the normals the same way:
- each seed is the first 32-bit word of numpy's `SeedSequence(entropy=seed, pool_size=24)`, with
  `spawn_key=(index, depth)` for a node (index = the node's position in its level, 0 = leftmost;
  the root has index 0, depth 0) and no spawn key for the root's own increment;
- each z is `torch.randn(shape)` from a `torch.Generator` freshly seeded with that word;
- the bridge arithmetic is done in the order written above, and a query's pieces are summed left to right.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def node_seed(entropy: int, pool_size: int, spawn_key: tuple[int, int] | None = None) -> int:
    """The seed of one tree node's normal draw: the first word of a numpy SeedSequence for (entropy, node)."""
    if spawn_key is None:
        sequence = np.random.SeedSequence(entropy=entropy, pool_size=pool_size)
    else:
        sequence = np.random.SeedSequence(entropy=entropy, spawn_key=spawn_key, pool_size=pool_size)
    return int(sequence.generate_state(1)[0])


def seeded_normal(shape, dtype, device, seed: int) -> torch.Tensor:
    """z ~ N(0, I) of `shape`, drawn from a generator seeded with `seed` (the same z every time).

    The generator lives on `device`, as torchsde's: a CUDA path differs from a CPU path of the same seed."""
    if torch.device(device).type == "meta":  # no values and no generator there: the shape is all there is
        return torch.empty(shape, dtype=dtype, device=device)
    generator = torch.Generator(device).manual_seed(seed)
    return torch.randn(shape, dtype=dtype, device=device, generator=generator)


class BrownianInterval:
    """One Brownian path W on [t0, t1] with values of `shape`, fixed by the integer `entropy`.

    `interval(ta, tb)` returns the increment W(tb) - W(ta) for t0 <= ta <= tb <= t1 (queries are
    clamped into [t0, t1] and rounded to `tol`, as torchsde does).
    """

    def __init__(self, t0: float, t1: float, shape, dtype=torch.float32, device="cpu", entropy: int = 0,
                 tol: float = 1e-6, pool_size: int = 24):
        t0, t1 = float(t0), float(t1)
        if not t0 <= t1:  # t0 == t1 is allowed: a path with no increments (a 1-step schedule has one sigma)
            raise ValueError(f"a BrownianInterval needs t0 <= t1, got t0={t0}, t1={t1}")
        if not 0 < tol < 1:
            raise ValueError(f"tol is the time resolution and must be in (0, 1), got {tol}")
        self.shape, self.dtype, self.device = tuple(shape), dtype, torch.device(device)
        self.entropy, self.pool_size = int(entropy), pool_size
        self.decimals = -int(math.log10(tol))  # times are rounded to this many decimals
        self.start, self.end = self._round(t0), self._round(t1)
        root_seed = node_seed(self.entropy, pool_size)
        self.root_increment = seeded_normal(self.shape, dtype, self.device, root_seed) * math.sqrt(t1 - t0)

    def _round(self, t: float) -> float:
        return round(t, self.decimals)

    def __call__(self, ta: float, tb: float) -> torch.Tensor:
        ta = min(max(float(ta), self.start), self.end)
        tb = min(max(float(tb), self.start), self.end)
        if ta > tb:
            raise ValueError(f"a Brownian increment needs ta <= tb, got ta={ta}, tb={tb}")
        ta, tb = self._round(ta), self._round(tb)
        if ta == tb:
            return torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        pieces: list[torch.Tensor] = []
        self._collect(self.start, self.end, 0, 0, self.root_increment, ta, tb, pieces)
        total = pieces[0]
        for piece in pieces[1:]:  # left to right
            total = total + piece
        return total

    def _collect(self, start, end, depth, index, increment, ta, tb, pieces) -> None:
        """Append to `pieces` the increments of the largest tree nodes tiling [ta, tb] within node [start, end]."""
        if ta == start and tb == end:
            pieces.append(increment)
            return
        middle = self._round(0.5 * (end + start))
        left, right = self._bridge(start, middle, end, increment, node_seed(self.entropy, self.pool_size, (index, depth)))
        if tb <= middle:
            self._collect(start, middle, depth + 1, 2 * index, left, ta, tb, pieces)
        elif ta >= middle:
            self._collect(middle, end, depth + 1, 2 * index + 1, right, ta, tb, pieces)
        else:  # [ta, tb] straddles the midpoint: its left part, then its right part
            self._collect(start, middle, depth + 1, 2 * index, left, ta, middle, pieces)
            self._collect(middle, end, depth + 1, 2 * index + 1, right, middle, tb, pieces)

    def _bridge(self, start, middle, end, increment, seed) -> tuple[torch.Tensor, torch.Tensor]:
        """Split W_{start,end} into (W_{start,middle}, W_{middle,end}) by the Brownian bridge."""
        left_length, right_length = middle - start, end - middle
        reciprocal_length = 1 / (end - start)
        mean = left_length * increment * reciprocal_length  # (u - s) W_{s,t} / (t - s)
        variance = left_length * right_length * reciprocal_length  # (u - s)(t - u) / (t - s)
        left = mean + math.sqrt(variance) * seeded_normal(self.shape, self.dtype, self.device, seed)
        return left, increment - left


class BrownianTreeNoiseSampler:
    """Standard normal noise for an SDE step from sigma to sigma_next, taken from one Brownian path in sigma:

        noise(sigma, sigma_next) = (W(sigma_next) - W(sigma)) / sqrt(|sigma_next - sigma|)     ~ N(0, I)

    Steps that cover disjoint sigma ranges get independent noise, and a fine step and the coarse step
    that contains it get correlated noise (the same path), which is what makes the sampler converge as
    the number of steps grows. `seed` is an int (one path for the whole batch, of `like`'s shape) or a
    list of ints, one path per batch item; None draws one from torch's global generator (as diffusers).
    """

    def __init__(self, like: torch.Tensor, sigma_min: float, sigma_max: float, seed: int | list[int] | None = None):
        if seed is None:
            seed = torch.randint(0, 2**63 - 1, []).item()
        self.batched = isinstance(seed, (list, tuple))
        if self.batched and len(seed) != like.shape[0]:
            raise ValueError(f"noise_sampler_seed holds {len(seed)} seeds for a batch of {like.shape[0]}; give one per item")
        seeds = list(seed) if self.batched else [seed]
        shape = like.shape[1:] if self.batched else like.shape
        low, high = sorted((float(sigma_min), float(sigma_max)))
        self.paths = [BrownianInterval(low, high, shape, like.dtype, like.device, entropy=s) for s in seeds]

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        sigma, sigma_next = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        low, high = sorted((sigma, sigma_next))
        sign = 1.0 if sigma <= sigma_next else -1.0  # W(sigma_next) - W(sigma), whichever way the step goes
        increment = torch.stack([path(low, high) for path in self.paths]) * sign  # (paths, *shape)
        increment = increment if self.batched else increment[0]
        return increment / (sigma_next - sigma).abs().sqrt()
