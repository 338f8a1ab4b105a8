"""`BaseOutput`: what models, schedulers and pipelines return, readable every way diffusers' outputs are.

A dataclass whose fields are also the entries of an ordered dict, so that all of these work:

    out.prev_sample            # attribute
    out["prev_sample"]         # string key
    out[0]                     # integer index into `to_tuple()`
    out.to_tuple()             # the fields that are not None, in declaration order
    out.keys(), out.values(), out.items()

Fields left at None are not entries (as in diffusers' `BaseOutput`), so `out[0]` is always the first
field that was set. Subclasses are plain `@dataclass` classes that list their fields.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Any


class BaseOutput(OrderedDict):
    """Base of every `*Output` dataclass: attribute, key and index access over the fields that are set."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None:
                self[field.name] = value

    def __getitem__(self, key: str | int | slice) -> Any:
        if isinstance(key, str):
            return dict(self.items())[key]
        return self.to_tuple()[key]

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        super().__setattr__(key, value)  # keep the attribute and the entry the same object

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.keys() and value is not None:
            super().__setitem__(name, value)
        super().__setattr__(name, value)

    def _refuse(self, *args, **kwargs):
        raise TypeError(f"a {type(self).__name__} cannot be reshaped; build a new one or set its fields as attributes")

    __delitem__ = pop = popitem = setdefault = update = _refuse

    def to_tuple(self) -> tuple:
        """The values of the fields that are set, in the order the dataclass declares them."""
        return tuple(self.values())

    def __reduce__(self):
        # a dataclass rebuilt from its fields (OrderedDict's own reduce would call __init__ with no arguments)
        return type(self), tuple(getattr(self, field.name) for field in dataclasses.fields(self))
