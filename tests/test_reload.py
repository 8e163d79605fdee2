"""ConfigWatcher in-process: the ways real platforms update files, debouncing, and the periodic fallback."""

from __future__ import annotations

import errno
import logging
import os
import queue
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from watchdog.observers.api import BaseObserver, EventEmitter

from forwarder.reload import ConfigWatcher

HOUR = 3600.0  # a periodic check that never comes during a test: what is seen, events delivered
WAIT = 10.0  # seconds a test waits for an expected callback before it fails


def publish_kubernetes_secret(directory: Path, files: Mapping[str, str]) -> None:
    """Update ``directory`` the way the kubelet updates a mounted secret (its AtomicWriter).

    The files live in a new timestamped directory; ``..data`` is a symlink to it, replaced atomically by
    renaming a fresh symlink over it; each visible name is a symlink ``name -> ..data/name``; the previous
    timestamped directory is removed last.
    """
    directory.mkdir(exist_ok=True)
    generation = Path(tempfile.mkdtemp(prefix="..", dir=directory))
    for name, text in files.items():
        (generation / name).write_text(text)
    data, staged = directory / "..data", directory / "..data_tmp"
    previous = os.readlink(data) if data.is_symlink() else None
    os.symlink(generation.name, staged)
    os.replace(staged, data)
    for name in files:
        if not (directory / name).is_symlink():
            os.symlink(f"..data/{name}", directory / name)
    if previous is not None:
        shutil.rmtree(directory / previous)


def save(path: Path, text: str) -> None:
    """Replace ``path`` the way editors save: write a temporary file, rename it over the original.

    A periodic check may run at any moment; an in-place write would let it see the truncated file.
    """
    temporary = path.with_name(f".{path.name}.swp")
    temporary.write_text(text)
    os.replace(temporary, path)


class Changes:
    """An ``on_change`` that records what the watched file reads as at each call (None if missing)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._calls: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str | None] = []

    def __call__(self) -> None:
        try:
            text: str | None = self.path.read_text()
        except FileNotFoundError:
            text = None
        self.seen.append(text)
        self._calls.put(text)

    def next(self) -> str | None:
        """What the file read as at the next call; fails the test if no call comes."""
        try:
            return self._calls.get(timeout=WAIT)
        except queue.Empty:
            raise AssertionError(f"on_change not called within {WAIT}s; calls so far {self.seen}") from None


class _DeafEmitter(EventEmitter):
    """Watches nothing, like a Docker bind mount from some hosts: no event ever arrives."""

    def queue_events(self, timeout: float) -> None:
        self.stopped_event.wait(timeout)


def _deaf_observer() -> BaseObserver:
    return BaseObserver(_DeafEmitter)


def _no_inotify_left() -> BaseObserver:
    raise OSError(errno.EMFILE, "inotify instance limit reached")


@pytest.fixture
def start_watcher() -> Iterator[Callable[..., ConfigWatcher]]:
    """Start watchers; every one is stopped at the end of the test."""
    started: list[ConfigWatcher] = []

    def start(files: list[Path], on_change: Callable[[], None], interval: float = HOUR,
              **kwargs: Any) -> ConfigWatcher:
        watcher = ConfigWatcher(files, on_change, interval, **kwargs)
        watcher.start()
        started.append(watcher)
        return watcher

    yield start
    for watcher in started:
        watcher.stop()


def _wait_for_a_later_check(watcher: ConfigWatcher) -> None:
    """Return once a check that began after this call has completed.

    ``checks`` counts completed checks, so one may be under way now; the one after it began later.
    """
    assert watcher.wait_for_checks(watcher.checks + 2, WAIT)


def test_kubernetes_secret_swaps_are_each_seen_once(
        tmp_path: Path, start_watcher: Callable[..., ConfigWatcher]) -> None:
    secrets = tmp_path / "secrets"
    publish_kubernetes_secret(secrets, {"key": "key-0", "secret": "secret-0"})
    changes = Changes(secrets / "key")
    watcher = start_watcher([secrets / "key", secrets / "secret"], changes)
    for n in (1, 2, 3):
        publish_kubernetes_secret(secrets, {"key": f"key-{n}", "secret": f"secret-{n}"})
        assert changes.next() == f"key-{n}"
    watcher.stop()
    assert changes.seen == ["key-1", "key-2", "key-3"]


def test_an_editors_atomic_save_is_seen(tmp_path: Path, start_watcher: Callable[..., ConfigWatcher]) -> None:
    config = tmp_path / "forwarder.toml"
    config.write_text("log_level = 'info'\n")
    changes = Changes(config)
    start_watcher([config], changes)
    save(config, "log_level = 'debug'\n")
    assert changes.next() == "log_level = 'debug'\n"


def test_an_in_place_write_is_seen(tmp_path: Path, start_watcher: Callable[..., ConfigWatcher]) -> None:
    config = tmp_path / "forwarder.toml"
    config.write_text("log_level = 'info'\n")
    changes = Changes(config)
    start_watcher([config], changes)
    with config.open("r+") as file:  # same inode, no rename
        file.write("log_level = 'warn'\n")
    assert changes.next() == "log_level = 'warn'\n"


def test_writes_in_quick_succession_make_one_call(
        tmp_path: Path, start_watcher: Callable[..., ConfigWatcher]) -> None:
    config = tmp_path / "forwarder.toml"
    config.write_text("v0")
    changes = Changes(config)
    start_watcher([config], changes)
    for n in range(1, 6):
        config.write_text(f"v{n}")
    assert changes.next() == "v5"
    config.write_text("after")  # a later, separate change: any extra call for the burst comes before it
    assert changes.next() == "after"
    assert changes.seen == ["v5", "after"]


def test_a_watcher_without_events_sees_a_change_through_the_periodic_check(
        tmp_path: Path, start_watcher: Callable[..., ConfigWatcher]) -> None:
    config = tmp_path / "forwarder.toml"
    config.write_text("v0")
    changes = Changes(config)
    start_watcher([config], changes, interval=0.2, observer_factory=_deaf_observer)
    save(config, "v1")
    assert changes.next() == "v1"


def test_without_an_observer_one_warning_and_the_periodic_check(
        tmp_path: Path, start_watcher: Callable[..., ConfigWatcher],
        caplog: pytest.LogCaptureFixture) -> None:
    config, secret = tmp_path / "forwarder.toml", tmp_path / "secret"
    config.write_text("v0")
    changes = Changes(config)
    with caplog.at_level(logging.WARNING, logger="forwarder.reload"):
        watcher = start_watcher([config], changes, interval=0.2, observer_factory=_no_inotify_left)
        watcher.watch([config, secret])
        save(config, "v1")
        assert changes.next() == "v1"
    assert [r.getMessage() for r in caplog.records] == [
        "Cannot watch files for events; checking their content periodically instead"]


def test_a_directory_that_cannot_be_watched_is_checked_periodically(
        tmp_path: Path, start_watcher: Callable[..., ConfigWatcher],
        caplog: pytest.LogCaptureFixture) -> None:
    later = tmp_path / "mounted-later" / "key"
    changes = Changes(later)
    with caplog.at_level(logging.WARNING, logger="forwarder.reload"):
        start_watcher([later], changes, interval=0.2)
        later.parent.mkdir()
        save(later, "key-1")
        assert changes.next() == "key-1"
    assert [(r.getMessage(), r.fields["directory"]) for r in caplog.records] == [  # type: ignore[attr-defined]
        ("Cannot watch a directory; checking its files periodically instead", str(later.parent))]


def test_touching_a_file_without_changing_it_calls_nothing(
        tmp_path: Path, start_watcher: Callable[..., ConfigWatcher]) -> None:
    config = tmp_path / "forwarder.toml"
    config.write_text("same")
    changes = Changes(config)
    watcher = start_watcher([config], changes, interval=0.2)
    os.utime(config)
    save(config, "same")
    _wait_for_a_later_check(watcher)
    assert changes.seen == []


def test_a_missing_file_appearing_and_vanishing_are_changes(
        tmp_path: Path, start_watcher: Callable[..., ConfigWatcher]) -> None:
    secret = tmp_path / "secret"
    changes = Changes(secret)
    start_watcher([secret], changes)
    secret.write_text("s3cr3t")
    assert changes.next() == "s3cr3t"
    secret.unlink()
    assert changes.next() is None


def test_watch_replaces_the_watched_files(
        tmp_path: Path, start_watcher: Callable[..., ConfigWatcher]) -> None:
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    old, new = tmp_path / "old" / "key", tmp_path / "new" / "key"
    old.write_text("old-0")
    new.write_text("new-0")
    changes = Changes(new)
    watcher = start_watcher([old], changes, interval=0.2)
    watcher.watch([new])
    save(old, "old-1")
    _wait_for_a_later_check(watcher)
    assert changes.seen == []
    save(new, "new-1")
    assert changes.next() == "new-1"

