"""Compile the agent's request path with mypyc, in place, for development and benchmarks.

    .venv/bin/python agent/build_native.py     (``make native``; ``make clean-native`` undoes it)

The modules of ``mesh_agent.native.NATIVE_MODULES`` get compiled extensions beside their sources,
plus one shared runtime library, ``mesh_agent/_native__mypyc*.so``, so nothing lands outside the
package. ``mesh_agent/_native.built`` records each source's size and modification time: if a
source changes after the build, ``mesh_agent`` loads every one of them interpreted (with a
warning) rather than run compiled code that no longer matches its source.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# The old build's record goes before anything imports mesh_agent (whose guard would read it).
(ROOT / "mesh_agent" / "_native.built").unlink(missing_ok=True)

from mesh_agent.native import BUILD_RECORD, NATIVE_MODULES, source_path, source_stamp  # noqa: E402

# Run in a child so that setuptools' and mypyc's state stays out of this process.
SETUP = """
import sys
from setuptools import setup
from mypyc.build import mypycify
setup(
    name="mesh-agent-native",
    ext_modules=mypycify(sys.argv[1:], group_name="mesh_agent._native", opt_level="3"),
    script_args=["build_ext", "--inplace", "--build-temp", "build/native-temp"],
)
"""


def main() -> int:
    for stale in (ROOT / "mesh_agent").rglob("*.so"):
        stale.unlink()
    sources = [os.path.relpath(source_path(name), ROOT) for name in NATIVE_MODULES]
    stamps = {name: source_stamp(source_path(name)) for name in NATIVE_MODULES}
    done = subprocess.run(  # noqa: S603 (our own interpreter and files)
        [sys.executable, "-c", SETUP, *sources],
        cwd=ROOT,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
    )
    if done.returncode != 0:
        sys.stderr.write(done.stdout.decode(errors="replace")[-6000:])
        sys.stderr.write(done.stderr.decode(errors="replace")[-6000:])
        return done.returncode
    if any(source_stamp(source_path(name)) != stamp for name, stamp in stamps.items()):
        sys.stderr.write("a source changed during the build: run it again\n")
        return 1
    # Written last: without it the compiled modules are never trusted.
    Path(BUILD_RECORD).write_text("".join(f"{name} {stamp}\n" for name, stamp in stamps.items()))
    print(f"compiled {len(sources)} modules of mesh_agent in place")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
