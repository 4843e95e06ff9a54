"""The example scripts that the experiments drive, loaded from `examples/` by path: they are scripts a user runs,
not a package, and the experiments call their `main()` in-process so that each run costs no interpreter start."""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType


EXAMPLES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def load_example(name: str) -> ModuleType:
    if name in sys.modules:  # already imported (the tests import the examples themselves)
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES_DIR, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


run_classification = load_example("run_classification")
