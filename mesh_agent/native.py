"""Which of the agent's modules are compiled to C with mypyc, and whether this process runs them.

The request path (``mesh_agent.proxy`` and the routing, balancing and resilience objects it calls
per request) is plain, strictly typed Python that mypyc compiles unchanged: the same source runs
interpreted anywhere and compiled where a wheel or ``make native`` built it, about a third faster
per request (``bench/proxy.py``). Everything else (start-up, config loading, the control plane
client, the admin server, telemetry export) stays interpreted: it is not on the hot path, and
interpreted code is easier to debug.

Compiled code checks the declared types at run time, so a wrong annotation shows up as a
``TypeError`` there: ``make test`` runs the suite against the compiled build for that reason.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

__all__ = [
    "BUILD_RECORD",
    "NATIVE_MODULES",
    "compiled_modules",
    "guard",
    "source_path",
    "source_stamp",
]

PACKAGE_DIR = Path(__file__).resolve().parent
# Written by agent/build_native.py (an in-place development build) after a good build: each
# compiled module's source size and mtime at build time. Wheels carry no record: their compiled
# modules are trusted as installed.
BUILD_RECORD = PACKAGE_DIR / "_native.built"

# In dependency order; every module here must compile (agent/build_native.py, agent/setup.py).
NATIVE_MODULES: tuple[str, ...] = (
    "mesh_agent.balancer",
    "mesh_agent.resilience",
    "mesh_agent.routing",
    "mesh_agent.telemetry",
    "mesh_agent.proxy.errors",
    "mesh_agent.proxy.contracts",
    "mesh_agent.proxy.flow",
    "mesh_agent.proxy.http1",
    "mesh_agent.proxy.downstream",
    "mesh_agent.proxy.upstream",
    "mesh_agent.proxy.exchange",
    "mesh_agent.proxy.inbound",
    "mesh_agent.proxy.outbound",
    "mesh_agent.proxy.mirror",
    "mesh_agent.proxy",
)


def compiled_modules() -> list[str]:
    """The modules of :data:`NATIVE_MODULES` this process has loaded from compiled extensions."""
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    out = []
    for name in NATIVE_MODULES:
        module = sys.modules.get(name)
        path = getattr(module, "__file__", None) or ""
        if path.endswith(suffixes):
            out.append(name)
    return out


def source_path(name: str) -> Path:
    """The source file of one of the agent's modules."""
    parts = name.split(".")[1:]
    path = PACKAGE_DIR.joinpath(*parts)
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def source_stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def _stale() -> list[str]:
    """Modules whose source changed after the in-place build (all of them if unreadable)."""
    try:
        lines = BUILD_RECORD.read_text().splitlines()
    except FileNotFoundError:
        return []
    recorded = dict(line.split(" ", 1) for line in lines if " " in line)
    stale = []
    for name in NATIVE_MODULES:
        try:
            current = source_stamp(source_path(name))
        except OSError:
            current = ""
        if recorded.get(name) != current:
            stale.append(name)
    return stale


class _Interpreted(importlib.abc.MetaPathFinder):
    """Loads the compiled modules from their sources instead (the build is out of date)."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in NATIVE_MODULES:
            return None
        source = source_path(fullname)
        package = source.name == "__init__.py"
        return importlib.util.spec_from_file_location(
            fullname,
            source,
            submodule_search_locations=[str(source.parent)] if package else None,
        )


def guard() -> None:
    """Called by ``mesh_agent/__init__``: with ``MESH_AGENT_INTERPRETED`` set, or if a compiled
    module's source changed since the in-place build, load all of them from source (they are
    compiled as one group and cannot be mixed); say so once in the second case."""
    if os.environ.get("MESH_AGENT_INTERPRETED"):
        # Asked for (profilers and debuggers see Python frames); nothing to warn about.
        sys.meta_path.insert(0, _Interpreted())
        return
    stale = _stale()
    if stale:
        sys.stderr.write(
            "mesh_agent: compiled modules are older than their sources "
            f"({', '.join(stale[:3])}{', ...' if len(stale) > 3 else ''}); running them "
            "interpreted. `make native` rebuilds them, `make clean-native` removes them.\n"
        )
        sys.meta_path.insert(0, _Interpreted())
