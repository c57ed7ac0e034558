"""The join token file's cache: a rotation is noticed within RECHECK_S, even one whose file
has the same modification time as the last (file times come from a coarse clock)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from app.agents import token


class _Clock:
    def __init__(self) -> None:
        self.now = time.monotonic()

    def monotonic(self) -> float:
        return self.now


def test_a_rotation_within_one_file_time_tick_is_noticed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = _Clock()
    monkeypatch.setattr(token, "time", clock)
    path = tmp_path / "join-token"
    served = token.JoinToken(path)
    old = served.ensure()
    assert served.check(old)
    stamp = path.stat()
    new = token.JoinToken(path).rotate()  # another process: meshctl token rotate
    # As if written in the same tick of the file-time clock as the token it replaced.
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert served.check(old)  # within RECHECK_S the cached token may still pass
    clock.now += token.RECHECK_S
    assert not served.check(old)
    assert served.check(new)
