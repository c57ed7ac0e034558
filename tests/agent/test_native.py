"""The compiled request path (mesh_agent/native.py): a build is used while it matches its
sources and never once a source changed; MESH_AGENT_INTERPRETED forces the sources."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import mesh_agent
from mesh_agent import native

PACKAGE = Path(mesh_agent.__file__).resolve().parent
PROBE = (
    "import mesh_agent.proxy.flow as m, mesh_agent.native as n;"
    " print(m.__file__.rsplit('.', 1)[-1], len(n.compiled_modules()))"
)

pytestmark = pytest.mark.skipif(
    not os.path.exists(native.BUILD_RECORD), reason="no in-place compiled build (make native)"
)


def _copy(tmp_path: Path) -> Path:
    """The package with its build, mtimes kept (copytree copies them): a build still current."""
    shutil.copytree(PACKAGE, tmp_path / "mesh_agent", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def _probe(root: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=root,  # `python -c` puts the working directory first on sys.path: the copy
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )


def test_a_current_build_runs_compiled(tmp_path: Path) -> None:
    done = _probe(_copy(tmp_path))
    kind, count = done.stdout.split()
    assert kind == "so" and int(count) > 1  # the package brings the rest of the group along
    assert done.stderr == ""


def test_an_edited_source_makes_every_module_run_interpreted_and_says_so(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    edited = root / "mesh_agent" / "proxy" / "downstream.py"
    edited.write_text(edited.read_text() + "\n# edited after the build\n")
    done = _probe(root)
    # flow.py itself is unchanged: it is the whole group that falls back, never a mix.
    assert done.stdout.split() == ["py", "0"]
    assert "compiled modules are older than their sources" in done.stderr
    assert "mesh_agent.proxy.downstream" in done.stderr


def test_mesh_agent_interpreted_forces_the_sources_quietly(tmp_path: Path) -> None:
    done = _probe(_copy(tmp_path), MESH_AGENT_INTERPRETED="1")
    assert done.stdout.split() == ["py", "0"]
    assert done.stderr == ""
