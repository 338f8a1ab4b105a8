"""The sweep spec: a small JSON or TOML file -> a checked `Spec` -> the jobs, each fully determined.

    {
      "weights": "path/to/stable-diffusion-v1-5",        # a diffusers folder or one .safetensors file
      "prompts": ["a photograph of an astronaut riding a horse"],
      "negative_prompts": [""],                           # optional, default [""]
      "schedulers": ["DPM++ 2M Karras", "Euler a", "DDIM"],  # A1111 names, CLI names or class names
      "steps": [10, 20],
      "guidance_scales": [7.5],
      "seeds": [0, 1],
      "size": "512x512",                                  # WIDTHxHEIGHT, multiples of 8
      "dtype": "fp32",                                    # fp32 | bf16 | fp16 | auto
      "loras": [[], [["pixel.safetensors", 0.8]]],        # optional: sets of [LoRA file, scale], [] = none
      "threads": 1                                        # intra-op threads of each process (see below)
    }

A job is one point of the product of the lists. Its id is a hash of everything that decides its image
(weights, dtype, prompt, negative prompt, scheduler name with the class and config overrides it means,
steps, guidance, seed, size, and its LoRA set with the scales, when it has one), so the same job has the same id in every run, on every rank and world size.
Everything is checked here, before any process loads weights; an error names the field.

`threads` is part of a job too: on a CPU, the number of threads a matrix product is split over changes the
last bits of its sums (measured here: a 1-thread and a 2-thread run of the same job gave different PNGs), so
every process of a sweep uses the spec's thread count, whatever the world size. On N cores run N ranks of 1
thread, or N/k ranks of k threads: the images are the same for the same `threads`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from minidiff.data import sd15_config
from minidiff.pipelines.input_checks import check_image_size
from minidiff.schedulers.names import find_sampler

DTYPES = ("fp32", "bf16", "fp16", "auto")
MAX_JOBS = 100_000  # a larger sweep (weeks on a CPU) is refused unless asked for: `minidiff sweep --allow-many-jobs`
LIST_FIELDS = ("prompts", "negative_prompts", "schedulers", "steps", "guidance_scales", "seeds")
KNOWN_FIELDS = ("weights", *LIST_FIELDS, "size", "dtype", "threads", "loras")


class SpecError(ValueError):
    """A sweep spec that cannot run; the message names the field."""


@dataclass(frozen=True)
class Spec:
    weights: str
    prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...]
    schedulers: tuple[str, ...]
    steps: tuple[int, ...]
    guidance_scales: tuple[float, ...]
    seeds: tuple[int, ...]
    width: int
    height: int
    dtype: str
    threads: int
    loras: tuple[tuple[tuple[str, float], ...], ...] = ((),)


@dataclass(frozen=True)
class Job:
    """One image: everything that decides it. `job_id` names its PNG and its manifest line."""

    weights: str
    dtype: str
    prompt: str
    negative_prompt: str
    scheduler: str
    steps: int
    guidance_scale: float
    seed: int
    width: int
    height: int
    threads: int
    loras: tuple[tuple[str, float], ...] = ()  # (LoRA file, scale) pairs, loaded as adapters and mixed

    @property
    def job_id(self) -> str:
        sampler = find_sampler(self.scheduler)
        identity = {**asdict(self), "scheduler_class": sampler.scheduler_class.__name__, "overrides": sampler.overrides}
        if not self.loras:
            del identity["loras"]  # a job without LoRA keeps the id it had before sweeps knew LoRA
        text = json.dumps(identity, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def read_spec_file(path: str | Path) -> dict:
    """The spec file's mapping: JSON (.json) or TOML (.toml)."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"sweep spec {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            import tomllib

            return tomllib.loads(text)
        return json.loads(text)
    except ModuleNotFoundError:
        raise SpecError(f"{path}: reading TOML needs Python 3.11 or newer; write the spec as JSON instead") from None
    except (json.JSONDecodeError, ValueError) as error:
        raise SpecError(f"{path} is not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {error}") from None


def load_spec(source: str | Path | dict) -> Spec:
    """Read (a path) or take (a dict) a spec and check every field; raises SpecError naming the first bad one."""
    raw = read_spec_file(source) if not isinstance(source, dict) else dict(source)
    unknown = sorted(set(raw) - set(KNOWN_FIELDS))
    if unknown:
        raise SpecError(f"unknown spec field(s) {unknown}; a spec has {list(KNOWN_FIELDS)}")
    if not isinstance(raw.get("weights"), str) or not raw["weights"].strip():
        raise SpecError("spec field 'weights' must name a diffusers folder or a .safetensors file")
    raw.setdefault("negative_prompts", [""])
    raw.setdefault("guidance_scales", [7.5])
    raw.setdefault("seeds", [0])
    lists = {name: _non_empty_list(raw, name) for name in LIST_FIELDS}
    _check_items(lists["prompts"], "prompts", str)
    _check_items(lists["negative_prompts"], "negative_prompts", str)
    _check_items(lists["schedulers"], "schedulers", str)
    _check_items(lists["steps"], "steps", int)
    _check_items(lists["guidance_scales"], "guidance_scales", (int, float))
    if not all(math.isfinite(g) for g in lists["guidance_scales"]):
        raise SpecError(f"spec field 'guidance_scales' has {lists['guidance_scales']}; NaN and infinity are refused: give real numbers")
    _check_items(lists["seeds"], "seeds", int)
    if any(not prompt.strip() for prompt in lists["prompts"]):
        raise SpecError("spec field 'prompts' has an empty prompt; give each prompt some text")
    width, height = _parse_size(raw.get("size", "512x512"))
    dtype = raw.get("dtype", "fp32")
    if dtype not in DTYPES:
        raise SpecError(f"spec field 'dtype' is {dtype!r}; choose one of {list(DTYPES)}")
    threads = raw.get("threads", 1)
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise SpecError(f"spec field 'threads' is {threads!r}; give a whole number of threads per process, at least 1")
    _check_schedulers_can_take_steps(lists["schedulers"], lists["steps"])
    loras = _lora_sets(raw.get("loras", [[]]))
    return Spec(
        weights=raw["weights"], prompts=tuple(lists["prompts"]), negative_prompts=tuple(lists["negative_prompts"]),
        schedulers=tuple(lists["schedulers"]), steps=tuple(lists["steps"]),
        guidance_scales=tuple(float(g) for g in lists["guidance_scales"]), seeds=tuple(lists["seeds"]),
        width=width, height=height, dtype=dtype, threads=threads, loras=loras,
    )


def expand_jobs(spec: Spec) -> list[Job]:
    """Every combination, in a fixed order (prompt, negative, scheduler, steps, guidance, seed)."""
    return list(iter_jobs(spec))


def iter_jobs(spec: Spec):
    """The jobs of `expand_jobs`, one at a time (the first few of a huge sweep, without building them all)."""
    product = itertools.product(spec.prompts, spec.negative_prompts, spec.schedulers, spec.steps, spec.guidance_scales,
                                spec.seeds, spec.loras)
    for prompt, negative, scheduler, steps, guidance, seed, loras in product:
        yield Job(spec.weights, spec.dtype, prompt, negative, scheduler, steps, guidance, seed, spec.width, spec.height,
                  spec.threads, loras)


def job_count(spec: Spec) -> int:
    """How many jobs the spec makes: the product of its lists' lengths, without listing them."""
    return math.prod(len(getattr(spec, name)) for name in AXES)


AXES = ("prompts", "negative_prompts", "schedulers", "steps", "guidance_scales", "seeds", "loras")  # what jobs range over


def check_job_count(spec: Spec, allow_many: bool = False) -> int:
    """The job count, or SpecError when it passes MAX_JOBS and `allow_many` is not set."""
    count = job_count(spec)
    if count > MAX_JOBS and not allow_many:
        axes = " x ".join(f"{len(getattr(spec, name))} {name}" for name in AXES)
        raise SpecError(
            f"the spec makes {count} jobs ({axes}), more than {MAX_JOBS}; check it with --dry-run, shorten its lists, "
            "or pass --allow-many-jobs if you mean it"
        )
    return count


def describe(spec: Spec, first: int = 10) -> list[str]:
    """What --dry-run prints: the job count, each axis (its length and first values) and the first jobs."""
    lines = [f"{job_count(spec)} jobs = " + " x ".join(f"{len(getattr(spec, name))} {name}" for name in AXES)
             + f", at {spec.width}x{spec.height}, {spec.dtype}, {spec.threads} thread(s) each"]
    for name in AXES:
        values = getattr(spec, name)
        shown = ", ".join(repr(value) for value in values[:5]) + (f", ... ({len(values) - 5} more)" if len(values) > 5 else "")
        lines.append(f"  {name:17s} {len(values):7d}: {shown}")
    lines.append(f"first {min(first, job_count(spec))} jobs:")
    for job in itertools.islice(iter_jobs(spec), first):
        lines.append(f"  {job.job_id}  {job.scheduler!r:24s} {job.steps:4d} steps  guidance {job.guidance_scale:g}  "
                     f"seed {job.seed}  {job.width}x{job.height}  {job.prompt!r}")
    return lines


def _lora_sets(value) -> tuple[tuple[tuple[str, float], ...], ...]:
    """"loras": a list of sets, each a list of [file, scale] pairs ([] for none); checked, files must exist."""
    example = 'e.g. "loras": [[], [["pixel.safetensors", 0.8], ["style.safetensors", 0.5]]]'
    if not isinstance(value, list) or not value:
        raise SpecError(f"spec field 'loras' must be a non-empty list of LoRA sets; {example}")
    sets = []
    for lora_set in value:
        if not isinstance(lora_set, list):
            raise SpecError(f"spec field 'loras' has {lora_set!r}; each entry is a list of [file, scale] pairs; {example}")
        pairs = []
        for pair in lora_set:
            if (not isinstance(pair, list) or len(pair) != 2 or not isinstance(pair[0], str)
                    or not isinstance(pair[1], (int, float)) or isinstance(pair[1], bool)):
                raise SpecError(f"spec field 'loras' has {pair!r}; each LoRA is [file, scale]; {example}")
            if not Path(pair[0]).is_file():
                raise SpecError(f"spec field 'loras': {pair[0]} is not a file")
            pairs.append((pair[0], float(pair[1])))
        sets.append(tuple(pairs))
    return tuple(sets)


def _non_empty_list(raw: dict, name: str) -> list:
    value = raw.get(name)
    if value is None:
        raise SpecError(f"spec field {name!r} is missing; give it a list, e.g. \"{name}\": [...]")
    if not isinstance(value, list):
        value = [value]
    if not value:
        raise SpecError(f"spec field {name!r} is an empty list; give it at least one value")
    return value


def _check_items(values: list, name: str, kind) -> None:
    for value in values:
        if not isinstance(value, kind) or isinstance(value, bool):
            raise SpecError(f"spec field {name!r} has {value!r}; every entry must be a {getattr(kind, '__name__', 'number')}")
    if name in ("steps",) and min(values) < 1:
        raise SpecError(f"spec field 'steps' has {min(values)}; a sweep needs at least 1 step")


def _parse_size(size) -> tuple[int, int]:
    if isinstance(size, str) and size.lower().count("x") == 1 and all(part.isdigit() for part in size.lower().split("x")):
        width, height = (int(part) for part in size.lower().split("x"))
    elif isinstance(size, list) and len(size) == 2 and all(isinstance(part, int) for part in size):
        width, height = size
    else:
        raise SpecError(f"spec field 'size' is {size!r}; write it as \"WIDTHxHEIGHT\", e.g. \"512x512\"")
    if width <= 0 or height <= 0 or width % 8 or height % 8:
        raise SpecError(f"spec field 'size' is {width}x{height}; width and height must be positive multiples of 8 (the VAE halves them 3 times)")
    try:
        check_image_size(height, width)
    except ValueError as error:
        raise SpecError(f"spec field 'size' is {width}x{height}: {error}") from None
    return width, height


def _check_schedulers_can_take_steps(schedulers: list[str], steps: list[int]) -> None:
    """Each name is known and each scheduler can do each step count (on SD 1.5's training schedule)."""
    config = sd15_config("scheduler")
    for name in schedulers:
        try:
            sampler = find_sampler(name)
        except ValueError as error:
            raise SpecError(f"spec field 'schedulers': {error}") from None
        if sampler.family == "flow":  # the few-step ("consistency") samplers run SD 1.5's UNet, with an LCM model
            raise SpecError(
                f"spec field 'schedulers': {name!r} steps a velocity model (flow matching), but a sweep runs SD 1.5's "
                "noise-predicting UNet; leave it out (see docs/flow_matching.md)"
            )
        for count in steps:
            try:
                sampler.from_config(config).set_timesteps(count)
            except ValueError as error:
                raise SpecError(f"spec fields 'schedulers'/'steps': {name} cannot take {count} steps: {error}") from None
