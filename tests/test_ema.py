"""minidiff.training.EMAModel against diffusers' EMAModel: the same decays and averaged weights, step by step."""

import pytest
import torch
from diffusers.training_utils import EMAModel as DiffusersEMAModel

from minidiff.training import EMAModel


def small_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.SiLU(), torch.nn.Linear(8, 2))
    model[2].bias.requires_grad_(False)  # a frozen parameter is copied, not averaged
    return model


@pytest.mark.parametrize(
    "settings",
    [{}, {"decay": 0.9, "update_after_step": 2}, {"use_ema_warmup": True, "inv_gamma": 1.0, "power": 0.75},
     {"decay": 0.99, "min_decay": 0.5}],
)
def test_ema_matches_diffusers_through_training(settings):
    model = small_model(0)
    ours, theirs = EMAModel(model.parameters(), **settings), DiffusersEMAModel(model.parameters(), **settings)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(12):
        loss = model(torch.randn(16, 4, generator=torch.Generator().manual_seed(step))).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model[2].bias.add_(0.1)  # the frozen bias changes by hand: the EMA must copy it
        ours.step(model.parameters())
        theirs.step(model.parameters())
        assert ours.cur_decay_value == theirs.cur_decay_value
        for a, b in zip(ours.shadow_params, theirs.shadow_params):
            assert torch.equal(a, b)  # same operations in the same order: bit for bit
    assert ours.state_dict().keys() == theirs.state_dict().keys()


def test_store_copy_to_restore_and_state_dict_round_trip():
    model = small_model(1)
    ema = EMAModel(model.parameters(), decay=0.5)
    trained = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.step(model.parameters())
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), ema.shadow_params))
    ema.restore(model.parameters())
    assert all(torch.equal(p, t + 1.0) for p, t in zip(model.parameters(), trained))
    again = EMAModel(small_model(2).parameters())
    again.load_state_dict(ema.state_dict())
    assert again.optimization_step == 1 and all(torch.equal(a, b) for a, b in zip(again.shadow_params, ema.shadow_params))
    with pytest.raises(RuntimeError, match="nothing stored"):
        ema.restore(model.parameters())
    with pytest.raises(TypeError, match="model.parameters()"):
        EMAModel(model)
