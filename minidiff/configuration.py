"""Configs: the keyword arguments a scheduler or model was built with, read and written as diffusers-style JSON.

Every scheduler and model in minidiff is built from keyword arguments named as in diffusers
(`beta_schedule`, `timestep_spacing`, `block_out_channels`, ...). The `@register_to_config`
decorator on `__init__` records them, so that

    scheduler.config                      # a read-only mapping of every init argument
    scheduler.config.beta_schedule        # attribute access works too
    DDIMScheduler.from_config(scheduler.config)   # the tutorial's way to swap schedulers
    scheduler.save_config(folder)         # writes scheduler_config.json (schedulers: also `save_pretrained`)
    PNDMScheduler.from_pretrained(folder, subfolder="scheduler")

A new object's config also holds `_class_name` and `_diffusers_version` (diffusers adds them the first
time the config is written or printed), so a config reloaded from the file has the same keys, except
`_use_default_values` (below), which only the new object has, as in diffusers.

A real diffusers `scheduler_config.json` loads as it is. Its bookkeeping keys are understood:
- `_class_name`: the class that wrote the file (keys only that class knew are left out when
  another class reads it);
- `_diffusers_version`: kept, not used (a new file gets the diffusers version we match, and `_minidiff_version`,
  which says which minidiff wrote it and is not kept on loading);
- `_use_default_values`: the keys the writer did *not* set explicitly. They are dropped on
  loading, so a new class applies its own defaults. This is why SD 1.5's config, which has no
  `timestep_spacing`, gives PNDM "leading" and Euler "linspace".
Keys that belong to another compatible class are kept as hidden config (so PNDM -> Euler -> PNDM
round-trips), and keys nobody knows are kept and reported in one warning.

Deprecated access: as in diffusers, `scheduler.num_train_timesteps` or `unet.in_channels` (a config key
that is not a real attribute) still returns the config value, with a FutureWarning pointing to
`scheduler.config.num_train_timesteps` (`deprecated_config_attribute`).

Refused fields: diffusers' classes take config fields for features minidiff does not implement
(a UNet's `encoder_hid_dim`, ...). A class lists them once, as data, in `_refused_config`
({field: the one value minidiff supports}). They are not `__init__` arguments: given at their
supported value (as every SD 1.x/2.x config.json does) they are recorded in `config` and change
nothing; any other value raises NotImplementedError naming the field (`check_refused_config`).
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import warnings
from pathlib import Path
from typing import Any

from minidiff.checkpoints.hub import HubOptions, download_file
from minidiff.utils.version import __version__


# The diffusers release whose config files and behaviour minidiff matches.
DIFFUSERS_CONFIG_VERSION = "0.42.1"


class FrozenConfig(dict):
    """A read-only dict of config values that also allows attribute access (`config.beta_start`)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no field {name!r}; its fields are {sorted(self)}") from None

    def _read_only(self, *args, **kwargs):
        raise TypeError(
            "a config is read-only; build a new object instead, e.g. `SchedulerClass.from_config(old.config, key=value)`"
        )

    __setitem__ = __delitem__ = __setattr__ = __delattr__ = _read_only
    pop = popitem = clear = update = setdefault = _read_only

    def __reduce__(self):
        return (FrozenConfig, (dict(self),))

    def __copy__(self):
        return FrozenConfig(self)

    def __deepcopy__(self, memo):
        import copy

        return FrozenConfig(copy.deepcopy(dict(self), memo))


def register_to_config(init):
    """Decorator for `__init__`: records every argument (given or defaulted) in `self.config`.

    The names of arguments left at their default are recorded in `_use_default_values`, exactly
    as diffusers does, so that `from_config` into another class lets that class pick its own defaults.
    Private keyword arguments (starting with `_`, such as `_class_name`) are stored, not passed on.
    """

    @functools.wraps(init)
    def recording_init(self, *args, **kwargs):
        refused_fields = getattr(type(self), "_refused_config", {})
        refused = {key: kwargs.pop(key) for key in list(kwargs) if key in refused_fields}
        check_refused_config(type(self), refused)
        private = {key: value for key, value in kwargs.items() if key.startswith("_")}
        public = {key: value for key, value in kwargs.items() if not key.startswith("_")}
        parameters = list(inspect.signature(init).parameters.values())[1:]  # skip `self`
        names = [p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        given = dict(zip(names, args))
        given.update({name: public[name] for name in names if name in public})
        values = {p.name: given.get(p.name, p.default) for p in parameters if p.name in names}
        values.update({key: refused.get(key, supported) for key, supported in refused_fields.items()})
        defaulted = [name for name in names if name not in given] + [key for key in refused_fields if key not in refused]
        bookkeeping = {"_class_name": type(self).__name__, "_diffusers_version": DIFFUSERS_CONFIG_VERSION}
        config = {**bookkeeping, **private, **values}
        if defaulted:
            config["_use_default_values"] = defaulted
        self.register_to_config(**config)
        init(self, *args, **public)

    recording_init.__signature__ = inspect.signature(init)
    return recording_init


def check_choice(field: str, value, allowed, owner: str = "") -> None:
    """Raise a ValueError naming the config field (and the class, `owner`) when `value` is not one of `allowed`."""
    if value not in allowed:
        prefix = f"{owner}: " if owner else ""
        raise ValueError(f"{prefix}unknown {field} {value!r}; expected one of {', '.join(map(repr, allowed))}")


def check_refused_config(cls, given: dict[str, Any]) -> None:
    """Raise NotImplementedError for a refused field (see the module docstring) set to an unsupported value."""
    for key, value in given.items():
        supported = cls._refused_config[key]
        if value != supported:
            raise NotImplementedError(
                f"{cls.__name__} config field {key}={value!r} is not implemented in minidiff (it supports only "
                f"{supported!r}); remove it from the config or set it to {supported!r}"
            )


def _init_keys(cls) -> set[str]:
    """The config fields `cls` takes: its `__init__` arguments and its refused fields."""
    parameters = inspect.signature(cls.__init__).parameters
    arguments = {
        name
        for name, p in parameters.items()
        if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    return arguments | set(getattr(cls, "_refused_config", {}))


def _init_defaults(cls) -> dict[str, Any]:
    parameters = inspect.signature(cls.__init__).parameters
    defaults = {name: p.default for name, p in parameters.items() if name != "self" and p.default is not p.empty}
    return {**getattr(cls, "_refused_config", {}), **defaults}


def _annotation_allows_sequence(cls, key: str) -> bool:
    """Whether `cls.__init__` annotates `key` as possibly a tuple/list (`int | tuple[int]`), so a scalar default
    does not forbid a per-block list."""
    parameter = inspect.signature(cls.__init__).parameters.get(key)
    if parameter is None:  # a refused field: not an argument
        return False
    annotation = parameter.annotation
    text = annotation if isinstance(annotation, str) else repr(annotation)
    return "tuple" in text or "list" in text


def _check_type(cls, key: str, value: Any, default: Any) -> None:
    """Reject a config value whose JSON type cannot be what the argument's default is."""
    if value is None or default is None:
        return
    if isinstance(value, (list, tuple)) and _annotation_allows_sequence(cls, key):
        return  # e.g. `attention_head_dim: int | tuple[int]` given per block, as SD 2.x's [5, 10, 20, 20]
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, (list, tuple)):
        ok = isinstance(value, (list, tuple))
    else:
        ok = True
    if not ok:
        raise ValueError(
            f"{cls.__name__} config key {key!r} must be a {type(default).__name__} "
            f"(like its default {default!r}), but the config gives {value!r} ({type(value).__name__}). "
            "Fix that value in the config file or pass it as a keyword argument."
        )


# Every class with a config, by name: how a config file's `_class_name` finds the class that wrote it.
CONFIG_CLASSES: dict[str, type] = {}


def is_deprecated_config_attribute(instance, name: str) -> bool:
    """Whether `instance.name` is a deprecated read of a config key: a key of its config that is not a real
    attribute (diffusers' rule; methods, properties and class attributes are found before this is asked)."""
    config = instance.__dict__.get("_internal_dict")
    return config is not None and name in config and name not in instance.__dict__


def deprecated_config_attribute(instance, name: str, example_owner: str, stacklevel: int):
    """The config value `instance.config[name]`, with diffusers' FutureWarning (same text) for reading it
    as an attribute. `example_owner` names the object in the suggestion: "scheduler" or "unet"."""
    cls_name = type(instance).__name__
    warnings.warn(
        f"Accessing config attribute `{name}` directly via '{cls_name}' object attribute is deprecated. Please "
        f"access '{name}' over '{cls_name}'s config object instead, e.g. '{example_owner}.config.{name}'.",
        FutureWarning,
        stacklevel=stacklevel,
    )
    return instance.__dict__["_internal_dict"][name]


def config_passed_as_path_message(cls) -> str:
    """diffusers' FutureWarning for `from_config("path")`, word for word (its missing space included)."""
    message = "It is deprecated to pass a pretrained model name or path to `from_config`."
    if "Scheduler" in cls.__name__:
        message += (
            f"If you were trying to load a scheduler, please use {cls}.from_pretrained(...) instead. Otherwise, please "
            "make sure to pass a configuration dictionary instead. This functionality will be removed in v1.0.0."
        )
    elif "Model" in cls.__name__:
        message += (
            f"If you were trying to load a model, please use {cls}.load_config(...) followed by {cls}.from_config(...) "
            "instead. Otherwise, please make sure to pass a configuration dictionary instead. This functionality will "
            "be removed in v1.0.0."
        )
    return message


class ConfigMixin:
    """Gives a class `config`, `from_config`, `save_config`, `load_config` and `from_pretrained` for its config.

    Subclasses set `config_name` (the JSON file name) and decorate `__init__` with `@register_to_config`.
    """

    config_name: str = "config.json"
    # Old init arguments that diffusers' from_config still hands to an `__init__(**kwargs)` which turns them into a
    # deprecation warning. diffusers' scheduler classes have none, and neither do minidiff's classes.
    _deprecated_kwargs: list[str] = []
    # Fields of diffusers' class that minidiff does not implement: {field: the only value it supports}.
    _refused_config: dict[str, Any] = {}
    # Keys written by other libraries' tools that carry no meaning for the object; never reported.
    _quiet_keys: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        CONFIG_CLASSES[cls.__name__] = cls

    @property
    def config(self) -> FrozenConfig:
        return self.__dict__["_internal_dict"]

    def __getattr__(self, name: str) -> Any:
        """Only called when normal lookup fails: a config key read as an attribute (deprecated, see the
        module docstring), else an AttributeError."""
        if is_deprecated_config_attribute(self, name):
            return deprecated_config_attribute(self, name, "scheduler", stacklevel=3)
        # Python's own message, exactly (diffusers' tests compare it); the hint goes in a note (PEP 678).
        error = AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'", name=name, obj=self)
        error.add_note(f"'{name}' is not a key of its config either (config values are read as `.config.<key>`)")
        raise error

    def register_to_config(self, **kwargs) -> None:
        previous = self.__dict__.get("_internal_dict", {})
        self.__dict__["_internal_dict"] = FrozenConfig({**previous, **kwargs})

    @classmethod
    def _compatible_classes(cls) -> list[type]:
        """Classes that can read this class's config (schedulers override this; models have none)."""
        return []

    # ----- reading -----------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: dict | str | os.PathLike | None = None, **overrides):
        """Builds the class from a config mapping (another object's `.config`, or a loaded JSON dict).

        `overrides` replace config values: `DDIMScheduler.from_config(config, clip_sample=False)`.
        A folder, file or hub id instead of a mapping still works, as in diffusers, with its FutureWarning
        (`from_pretrained` is the way to read one); `subfolder=` then says where the config file is.
        """
        if "pretrained_model_name_or_path" in overrides:  # diffusers' old keyword for the same thing
            config = overrides.pop("pretrained_model_name_or_path")
        if config is None:
            raise ValueError(f"{cls.__name__}.from_config needs a config mapping as its first argument")
        if isinstance(config, (str, os.PathLike)):
            warnings.warn(config_passed_as_path_message(cls), FutureWarning, stacklevel=2)
            config = cls.load_config(config, subfolder=overrides.pop("subfolder", None))
        if not isinstance(config, dict):
            raise TypeError(
                f"{cls.__name__}.from_config takes a config mapping (e.g. `scheduler.config`), got "
                f"{type(config).__name__}; to read a folder or hub id use {cls.__name__}.from_pretrained(...)"
            )
        init_kwargs, hidden = cls._split_config(dict(config), overrides)
        instance = cls(**init_kwargs)
        if "_class_name" in hidden:
            hidden["_class_name"] = cls.__name__
        instance.register_to_config(**hidden)
        return instance

    @classmethod
    def _split_config(cls, config: dict, overrides: dict) -> tuple[dict, dict]:
        """Returns (arguments for `cls.__init__`, keys to keep as hidden config), as diffusers' `extract_init_dict`."""
        defaulted = set(config.get("_use_default_values", []))
        config = {key: value for key, value in config.items() if key not in defaulted and key != "_use_default_values"}
        original = dict(config)

        expected = _init_keys(cls)
        other_classes_keys = set()
        for other in cls._compatible_classes():
            other_classes_keys |= _init_keys(other)
        other_classes_keys -= expected
        config = {key: value for key, value in config.items() if key not in other_classes_keys}

        writer_name = config.pop("_class_name", cls.__name__)
        if not isinstance(writer_name, str):
            raise ValueError(f"`_class_name` in a {cls.__name__} config must be a string, got {writer_name!r}")
        writer = CONFIG_CLASSES.get(writer_name)
        if writer_name != cls.__name__ and isinstance(writer, type):
            only_writer_knows = _init_keys(writer) - expected
            config = {key: value for key, value in config.items() if key not in only_writer_knows}
        config = {key: value for key, value in config.items() if not key.startswith("_")}

        overrides = dict(overrides)
        defaults = _init_defaults(cls)
        init_kwargs = {}
        for key in expected:
            if key in overrides:
                init_kwargs[key] = overrides.pop(key)
                config.pop(key, None)
            elif key in config:
                init_kwargs[key] = config.pop(key)
                _check_type(cls, key, init_kwargs[key], defaults.get(key))
        if overrides:
            raise TypeError(
                f"{cls.__name__}.from_config got unknown argument(s) {sorted(overrides)}; "
                f"{cls.__name__} takes {sorted(expected)}"
            )
        unknown = {key: value for key, value in config.items() if key not in cls._quiet_keys}
        if unknown:
            warnings.warn(
                f"The config attributes {unknown} were passed to {cls.__name__}, but are not expected and will "
                f"be ignored. Please verify your {cls.config_name} configuration file.",
                stacklevel=3,
            )
        hidden = {key: value for key, value in original.items() if key not in init_kwargs and key != "_minidiff_version"}
        return init_kwargs, hidden

    @classmethod
    def load_config(cls, path_or_repo_id: str | os.PathLike, subfolder: str | None = None, hub: HubOptions | None = None) -> dict:
        """Reads `config_name` from a local folder (or a file path), or from a hub repo through huggingface_hub."""
        config_file = cls._config_file(path_or_repo_id, subfolder, hub)
        try:
            text = Path(config_file).read_text(encoding="utf-8")
            config = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{config_file} is not valid JSON ({error}); fix or replace the file") from None
        if not isinstance(config, dict):
            raise ValueError(f"{config_file} must hold a JSON object of config keys, found {type(config).__name__}")
        return config

    @classmethod
    def _config_file(cls, path_or_repo_id, subfolder: str | None, hub: HubOptions | None = None) -> str:
        path = Path(path_or_repo_id)
        if path.is_file():
            return str(path)
        if path.is_dir():
            folder = path / subfolder if subfolder else path
            candidate = folder / cls.config_name
            if not candidate.is_file():
                raise FileNotFoundError(
                    f"no {cls.config_name} in {folder}; expected a diffusers-layout folder "
                    f"(e.g. stable-diffusion-v1-5/{subfolder or 'scheduler'}/{cls.config_name})"
                )
            return str(candidate)
        return download_file(str(path_or_repo_id), cls.config_name, subfolder=subfolder, hub=hub)

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, subfolder: str | None = None, **overrides):
        """`X.from_pretrained("path/to/sd15", subfolder="scheduler")`: load the config file, then `from_config`."""
        return cls.from_config(cls.load_config(path_or_repo_id, subfolder), **overrides)

    # ----- writing -----------------------------------------------------------------------------

    def to_json_string(self) -> str:
        config = dict(self.config)
        config.pop("_use_default_values", None)  # as diffusers: not written, so the file holds what was set
        config["_class_name"] = type(self).__name__
        # diffusers parses this field as a version number: name the diffusers release whose config format
        # we follow, and say in a key of our own (diffusers ignores keys starting with "_") who wrote it.
        config["_diffusers_version"] = config.get("_diffusers_version", DIFFUSERS_CONFIG_VERSION)
        config["_minidiff_version"] = __version__
        return json.dumps(_json_ready(config), indent=2, sort_keys=True) + "\n"

    def save_config(self, folder: str | os.PathLike, push_to_hub: bool = False, **push_to_hub_kwargs) -> Path:
        """Writes `config_name` into `folder` (created if needed) and returns the file's path.

        `push_to_hub` and its keyword arguments are diffusers' signature; minidiff never uploads (refused).
        """
        check_no_push_to_hub(push_to_hub, push_to_hub_kwargs)
        folder = Path(folder)
        if folder.is_file():
            raise ValueError(f"save_config needs a folder, but {folder} is a file")
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / self.config_name
        target.write_text(self.to_json_string(), encoding="utf-8")
        return target

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"


# The keyword arguments diffusers' save_config/save_pretrained pass on to its upload.
PUSH_TO_HUB_KWARGS = ("repo_id", "commit_message", "private", "token", "create_pr", "subfolder")


def check_no_push_to_hub(push_to_hub: bool, push_to_hub_kwargs: dict) -> None:
    """Refuse `push_to_hub=True` (minidiff works offline), and keyword arguments that are not push_to_hub's
    (diffusers ignores those silently, so a misspelt argument would go unnoticed)."""
    unknown = sorted(set(push_to_hub_kwargs) - set(PUSH_TO_HUB_KWARGS))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {unknown}; besides the folder, only push_to_hub and its "
                        f"arguments {list(PUSH_TO_HUB_KWARGS)} are accepted, as in diffusers")
    if push_to_hub:
        raise NotImplementedError(
            "push_to_hub=True is not supported: minidiff never uploads anything. Save without it, then upload the "
            "folder yourself, e.g. `huggingface_hub.upload_folder(folder_path=folder, repo_id=...)`"
        )


def _json_ready(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, Path):
        return value.as_posix()
    return value
