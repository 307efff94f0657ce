"""The synthetic checkpoints' cache (`portable.tiny.ensure_tiny`): a build that fails or is interrupted
leaves nothing behind, orphans of killed builds are removed, and an unusable cache is one clear error."""

import os
import subprocess
import sys
import time

import pytest

from dsv4.portable import tiny
from dsv4.portable.tiny import STALE_S, CacheError, ensure_tiny


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DSV4_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def dead_pid() -> int:
    """The pid of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_an_interrupted_build_leaves_no_directory(cache):
    def interrupt(done, total):
        if done == 3:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        ensure_tiny("tiny", progress=interrupt)
    assert list(cache.iterdir()) == []


def test_a_failed_build_leaves_no_directory(cache, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(tiny, "save_sharded", full_disk)
    with pytest.raises(CacheError) as e:
        ensure_tiny("tiny")
    assert str(e.value) == (f"cannot build the tiny model in the cache {cache} (No space left on device); "
                            f"set DSV4_CACHE to a writable directory")
    assert list(cache.iterdir()) == []


def test_orphans_of_killed_builds_are_removed_and_live_ones_kept(cache):
    cache.mkdir()
    old = time.time() - STALE_S - 60
    dead, alive = dead_pid(), os.getpid()
    dirs = {name: cache / name for name in (f".tiny-{dead}-abc", f".tiny-{dead}-new", f".tiny-{alive}-abc",
                                            ".tiny-k3x_9q2z", f".tiny2-{dead}-abc", "notes")}
    for name, d in dirs.items():
        d.mkdir()
        (d / "config.json").write_text("{}")
        if not name.endswith("-new"):
            os.utime(d, (old, old))
    path = ensure_tiny("tiny")
    assert path == cache / f"tiny-s0-v{tiny.FORMAT_VERSION}"
    left = sorted(p.name for p in cache.iterdir())
    # gone: the old build of a dead process and an old build from before pids were recorded; kept: a
    # fresh one (maybe a build on another machine), a live process's, another preset's, anything else
    assert left == sorted([f".tiny-{dead}-new", f".tiny-{alive}-abc", f".tiny2-{dead}-abc", "notes", path.name])
    os.utime(dirs[f".tiny-{dead}-new"], (old, old))
    assert ensure_tiny("tiny") == path                       # the built checkpoint's fast path cleans too
    assert not dirs[f".tiny-{dead}-new"].exists()


def test_an_unusable_cache_is_one_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    for cache, why in ((blocker, "it is not a directory"), (blocker / "sub", "Not a directory")):
        monkeypatch.setenv("DSV4_CACHE", str(cache))
        with pytest.raises(CacheError) as e:
            ensure_tiny("tiny")
        assert str(e.value) == (f"cannot build the tiny model in the cache {cache} ({why}); set DSV4_CACHE to a "
                                f"writable directory")
    monkeypatch.setenv("DSV4_CACHE", str(tmp_path / "read-only"))

    def refused(*args, **kwargs):          # what mkdtemp meets in a read-only directory (root ignores modes)
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(tiny.tempfile, "mkdtemp", refused)
    with pytest.raises(CacheError, match=r"read-only \(Permission denied\); set DSV4_CACHE"):
        ensure_tiny("tiny")
