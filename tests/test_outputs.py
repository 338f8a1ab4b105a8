"""BaseOutput behaves like diffusers' BaseOutput: attribute, key, index, to_tuple, keys/values/items, None left out."""

import pickle
from dataclasses import dataclass

import pytest
import torch
from diffusers.utils import BaseOutput as DiffusersBaseOutput

from minidiff.utils.outputs import BaseOutput


@dataclass
class Out(BaseOutput):
    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


@dataclass
class DiffusersOut(DiffusersBaseOutput):
    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


@pytest.mark.parametrize("with_x0", [False, True])
def test_every_access_matches_diffusers(with_x0):
    x, x0 = torch.randn(2), torch.randn(2)
    ours = Out(x, x0 if with_x0 else None)
    theirs = DiffusersOut(x, x0 if with_x0 else None)
    assert list(ours.keys()) == list(theirs.keys())
    assert len(ours.to_tuple()) == len(theirs.to_tuple())
    for a, b in zip(ours.to_tuple(), theirs.to_tuple()):
        assert a is not None and torch.equal(a, b)
    assert ours[0] is ours.prev_sample is ours["prev_sample"]
    assert [k for k, _ in ours.items()] == [k for k, _ in theirs.items()]
    if not with_x0:
        assert ours.pred_original_sample is None
        with pytest.raises(KeyError):
            ours["pred_original_sample"]
        with pytest.raises(IndexError):
            ours[1]


def test_setting_a_field_updates_the_entry_and_pickles():
    out = Out(torch.zeros(1))
    out.prev_sample = torch.ones(1)
    assert torch.equal(out["prev_sample"], torch.ones(1))
    out["pred_original_sample"] = torch.full((1,), 2.0)
    assert torch.equal(out.pred_original_sample, torch.full((1,), 2.0))
    again = pickle.loads(pickle.dumps(out))
    assert torch.equal(again[1], torch.full((1,), 2.0))
    with pytest.raises(TypeError, match="cannot be reshaped"):
        out.pop("prev_sample")
