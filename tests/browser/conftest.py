"""A real ``meshctl serve`` on a free port over a temporary SQLite file, and Chromium.

Chromium is Debian's (``/usr/bin/chromium``, or ``MESH_CHROMIUM``); in CI (``CI`` set) a
missing browser fails the run instead of skipping it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

REPO_ROOT = Path(__file__).resolve().parents[2]
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
BROWSER_REQUIRED = bool(os.environ.get("CI")) or os.environ.get(
    "MESH_TEST_REQUIRE_BROWSER", ""
) not in ("", "0")


def _unavailable(reason: str) -> None:
    if BROWSER_REQUIRED:
        pytest.fail(reason + " (required in CI)")
    pytest.skip(reason)


def chromium_path() -> str | None:
    configured = os.environ.get("MESH_CHROMIUM")
    if configured:
        return configured
    return shutil.which("chromium") or shutil.which("chromium-browser")


# Caps on event waits, not pauses: a page that is right answers at once. They are generous
# because `make test` runs the suite on several workers of a 2-core machine that may be busy.
WAIT_MS = 30_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def meshctl() -> list[str]:
    script = Path(sys.executable).with_name("meshctl")
    return [str(script)] if script.exists() else [sys.executable, "-m", "app.cli"]


def wait_until_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"meshctl serve exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"meshctl serve did not answer on {url} within {timeout} s")


# Where the session's live server keeps its data (its join token, for tests that act as agents).
LIVE_SERVER_DATA: dict[str, Path] = {}
LIVE_SERVER_ENV: dict[str, str] = {}
_PEOPLE: set[tuple[str, str]] = set()


def sign_in_path(
    email: str,
    *,
    role: str = "admin",
    teams: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> str:
    """A one-time sign-in path (``/sign-in/link/…``) for ``email`` on the server whose
    environment is ``env`` (default: the live server), made with ``meshctl user create`` (or
    ``user link``) as an admin would."""
    env = env or LIVE_SERVER_ENV
    known = (env["MESH_DATA_DIR"], email)
    if known in _PEOPLE:
        args = ["user", "link", email]
    else:
        args = ["user", "create", email, "--role", role, *(a for t in teams for a in ("--team", t))]
    done = subprocess.run([*meshctl(), *args], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    _PEOPLE.add(known)
    return "/sign-in/link/" + done.stdout.strip().rsplit("/sign-in/link/", 1)[1]


def admin_token(env: dict[str, str]) -> str:
    """An API token of the admin ``meshctl serve`` created on its empty database."""
    done = subprocess.run(
        [*meshctl(), "token", "create", "--user", "admin@mesh.local", "--name", "browser-tests",
         "--role", "admin"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data_dir = tmp_path_factory.mktemp("live-server")
    LIVE_SERVER_DATA["data_dir"] = data_dir
    port = free_port()
    env = {
        **os.environ,
        "MESH_DATABASE_URL": f"sqlite:///{data_dir / 'mesh.db'}",
        "MESH_DATA_DIR": str(data_dir),
    }
    LIVE_SERVER_ENV.update(env)
    log = (data_dir / "server.log").open("wb")
    process = subprocess.Popen(
        [*meshctl(), "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, process, timeout=120)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


# Module scope, not session: Playwright's sync API keeps an asyncio loop running in this thread
# while it is open, and under pytest-xdist a worker goes on to other tests (the agent's call
# asyncio.run()) after a browser module; they must find no loop running.
@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed")
    executable = chromium_path()
    if executable is None or not Path(executable).exists():
        _unavailable("Chromium not found (install Debian's chromium or set MESH_CHROMIUM)")
    from playwright.sync_api import expect

    expect.set_options(timeout=WAIT_MS)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def admin_storage(browser: Browser, live_server: str) -> Any:
    """Cookies of an admin signed in once, shared by the pages of every test."""
    context = browser.new_context(base_url=live_server)
    page = context.new_page()
    page.goto(sign_in_path("admin@example.com"))
    assert "/sign-in" not in page.url, page.url
    state = context.storage_state()
    context.close()
    return state


@pytest.fixture
def page(browser: Browser, live_server: str, admin_storage: Any) -> Iterator[Page]:
    context = browser.new_context(
        base_url=live_server, viewport={"width": 1280, "height": 860}, storage_state=admin_storage
    )
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    yield page
    context.close()
