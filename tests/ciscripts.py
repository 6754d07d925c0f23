"""The scripts under .ci/ that tests use as modules (manifests, dockerfile_check,
chart_readme), each loaded once by file path: .ci/ is no package."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

CI = Path(__file__).resolve().parent.parent / ".ci"


def load(name: str) -> ModuleType:
    """``.ci/<name>.py`` as the module ``name`` (the same object on every call)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, CI / f"{name}.py")
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
