"""Shared fixtures: random SD 1.5 folders written by weights_scripts/make_random_sd15.py (tiny by default)."""

import importlib.util
from pathlib import Path

import pytest

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
