"""Shared fixtures: random SD 1.5 folders written by weights_scripts/make_random_sd15.py (tiny by default)."""

import importlib.util
import os
from pathlib import Path

import pytest
import torch

# The default suite runs tiny models: one thread is faster than two, and many times faster than two threads
# fighting over a shared 2-core machine. The slow full-size tests get every core (fixture below).
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent


def load_weights_script(name: str):
    """Import a script of weights_scripts/ (not a package) as a module."""
    spec = importlib.util.spec_from_file_location(name, REPO / "weights_scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_sd15_folder(tmp_path_factory) -> Path:
    """A tiny random SD 1.5 folder (real layout and tokenizer, narrow networks), written once per test session."""
    return load_weights_script("make_random_sd15").make_random_sd15(tmp_path_factory.mktemp("tiny-sd15"), seed=0, tiny=True)


@pytest.fixture(autouse=True)
def all_cores_for_slow_tests(request):
    if request.node.get_closest_marker("slow") is None:
        yield
        return
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(1)
