"""The mesh-agent distribution (metadata in pyproject.toml). With ``MESH_AGENT_COMPILE=1`` the
modules of ``mesh_agent.native.NATIVE_MODULES`` are compiled with mypyc into the wheel (a C
compiler is needed); without it the wheel is pure Python and runs the same code interpreted."""

from __future__ import annotations

import os
import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent


def native_modules() -> list[str]:
    """NATIVE_MODULES read from the source, not imported: importing the package here would run
    its stale-build guard inside the build."""
    text = (HERE / "mesh_agent" / "native.py").read_text()
    block = text.split("NATIVE_MODULES: tuple[str, ...] = (", 1)[1].split(")", 1)[0]
    return re.findall(r'"([\w.]+)"', block)


def source(module: str) -> str:
    path = Path(*module.split("."))
    return str(path / "__init__.py") if (HERE / path).is_dir() else str(path.with_suffix(".py"))


ext_modules = []
if os.environ.get("MESH_AGENT_COMPILE") == "1":
    from mypyc.build import mypycify

    ext_modules = mypycify(
        [source(m) for m in native_modules()], group_name="mesh_agent._native", opt_level="3"
    )

setup(ext_modules=ext_modules)
