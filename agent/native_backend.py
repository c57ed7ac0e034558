"""The mesh-agent distribution's build backend: setuptools, plus mypy (for mypyc) when
``MESH_AGENT_COMPILE=1`` asks for the compiled request path (see ``setup.py``).

An in-tree backend only so that the interpreted build, the default, does not download mypy.
"""

from __future__ import annotations

import os
from typing import Any

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403 (the whole PEP 517 interface, unchanged)

COMPILER = "mypy>=1.10"


def _compiling() -> bool:
    return os.environ.get("MESH_AGENT_COMPILE") == "1"


def get_requires_for_build_wheel(config_settings: dict[str, Any] | None = None) -> list[str]:
    compiling = _compiling()
    # setuptools runs setup.py to answer this, before mypy is there: not compiling yet.
    os.environ["MESH_AGENT_COMPILE"] = "0"
    try:
        requires = _setuptools.get_requires_for_build_wheel(config_settings)
    finally:
        os.environ["MESH_AGENT_COMPILE"] = "1" if compiling else "0"
    return [*requires, COMPILER] if compiling else requires
