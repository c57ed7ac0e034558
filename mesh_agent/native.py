"""Which of the agent's modules are compiled to C with mypyc, and whether this process runs them.

The request path (``mesh_agent.proxy``, the routing, balancing and resilience objects it calls
per request, and telemetry) is plain, strictly typed Python that mypyc compiles unchanged: the
same source runs interpreted anywhere and compiled where a wheel or ``make native`` built it,
with about a fifth less CPU per request (``bench/proxy.py``). Everything else (start-up, config
loading, the control plane client, the admin server) stays interpreted: it is not on the hot
path, and interpreted code is easier to debug.

Compiled code checks the declared types at run time, so a wrong annotation shows up as a
``TypeError`` there: ``make test`` runs the suite against the compiled build for that reason.
"""

from __future__ import annotations

import os
import sys
from typing import Any

# Standard library only, and light: the running agent imports this module (``compiled_modules``
# for /metrics) and its memory budget is tight; importlib.abc alone would pull in
# importlib.resources, zipfile and tempfile. The finder below imports importlib.util only when
# it has something to load.

__all__ = [
    "BUILD_RECORD",
    "NATIVE_MODULES",
    "compiled_modules",
    "guard",
    "source_path",
    "source_stamp",
]

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# Written by agent/build_native.py (an in-place development build) after a good build: each
# compiled module's source size and mtime at build time. Wheels carry no record: their compiled
# modules are trusted as installed.
BUILD_RECORD = os.path.join(PACKAGE_DIR, "_native.built")

# In dependency order; every module here must compile (agent/build_native.py, agent/setup.py).
NATIVE_MODULES: tuple[str, ...] = (
    "mesh_agent.ids",
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
    import _imp  # built in: what importlib.machinery.EXTENSION_SUFFIXES is made of

    suffixes = tuple(_imp.extension_suffixes())
    out = []
    for name in NATIVE_MODULES:
        module = sys.modules.get(name)
        path = getattr(module, "__file__", None) or ""
        if path.endswith(suffixes):
            out.append(name)
    return out


def source_path(name: str) -> str:
    """The source file of one of the agent's modules."""
    path = os.path.join(PACKAGE_DIR, *name.split(".")[1:])
    return os.path.join(path, "__init__.py") if os.path.isdir(path) else path + ".py"


def source_stamp(path: str) -> str:
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}"


def _stale() -> list[str]:
    """Modules whose source changed after the in-place build (all of them if unreadable)."""
    try:
        with open(BUILD_RECORD) as f:
            lines = f.read().splitlines()
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


class _Interpreted:
    """A meta path finder (by shape) that loads the compiled modules from their sources."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in NATIVE_MODULES:
            return None
        import importlib.util

        source = source_path(fullname)
        package = os.path.basename(source) == "__init__.py"
        return importlib.util.spec_from_file_location(
            fullname,
            source,
            submodule_search_locations=[os.path.dirname(source)] if package else None,
        )

    def invalidate_caches(self) -> None:
        pass


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
