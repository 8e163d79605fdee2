"""Watch the config file and the secret files; report a change of their content to a callback.

The only module that imports ``watchdog``. It watches the *parent directories* of the files, never the
files: Kubernetes mounts a secret as ``dir/key -> ..data/key`` and updates it by atomically renaming a new
``..data`` symlink over the old one, and editors save by renaming a temporary file over the original; a
watch on the file itself would follow the old inode and miss every update after the first. Any event in a
watched directory only *nudges* a content check: after a short debounce (one save makes several events)
each file's sha256 is compared with the last one reported, and a difference is reported once the content
has held still for as long again, so only a real, finished change of content calls ``on_change``. The
same check also runs every ``interval`` seconds, because some platforms deliver no events at all (Docker
bind mounts from some hosts, exhausted inotify limits).

It knows nothing of settings: it does not parse the files and does not decide what a change means; the
daemon re-reads them in ``on_change``.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver, ObservedWatch

logger = logging.getLogger(__name__)

DEBOUNCE_SECONDS = 0.2
"""How long a check waits after the first event, so that the events of one save cause one check."""

# Only events that can change what a path reads as. Opens and read-only closes are left out: the check's
# own reads would otherwise nudge another check, forever.
_CONTENT_EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent, FileDeletedEvent, FileModifiedEvent, FileMovedEvent, FileClosedEvent, FileAttribEvent,
    DirCreatedEvent, DirDeletedEvent, DirMovedEvent]

def _fingerprint(path: Path) -> str:
    """sha256 of what ``path`` reads as (through any symlinks), or a marker if it is missing or unreadable."""
    try:
        with path.open("rb") as file:
            return hashlib.file_digest(file, "sha256").hexdigest()
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    except OSError as error:  # a marker per errno, so that a permission fix counts as a change
        return f"unreadable errno {error.errno}"


class _Nudge(FileSystemEventHandler):
    """Runs on watchdog's thread: only sets the flag the watcher's own thread waits on."""

    def __init__(self, wake: threading.Event) -> None:
        self._wake = wake

    def on_any_event(self, event: FileSystemEvent) -> None:
        self._wake.set()


class ConfigWatcher:
    """Calls ``on_change`` (from its own thread) when a watched file's content changes.

    ``files`` are compared by content, read through symlinks; a file that is missing or unreadable has a
    marker instead, so its appearance is a change too. ``interval`` is the period of the fallback check.
    ``observer_factory`` builds the watchdog observer (the platform's best by default); a test passes one
    that delivers no events. Every public method is thread-safe.
    """

    def __init__(self, files: Sequence[Path], on_change: Callable[[], None], interval: float, *,
                 observer_factory: Callable[[], BaseObserver] = Observer) -> None:
        self._on_change = on_change
        self._interval = interval
        self._observer_factory = observer_factory
        self._lock = threading.Lock()
        self._checked = threading.Condition(self._lock)
        self._wake = threading.Event()  # an event arrived, or stop() was called
        self._stopping = threading.Event()
        self._files = _absolute(files)
        self._fingerprints: dict[Path, str] = {}
        self._observer: BaseObserver | None = None
        self._watches: dict[Path, ObservedWatch] = {}  # directory -> its watch
        self._warned: set[Path] = set()  # directories we could not watch, warned about once each
        self._thread: threading.Thread | None = None
        self.checks = 0  # completed content checks, event-driven or periodic (see wait_for_checks)

    def start(self) -> None:
        """Take the files' current content as the baseline, then watch; a change from now on is reported."""
        with self._lock:
            self._fingerprints = _fingerprints(self._files)
            self._observer = self._start_observer()
            self._schedule()
            self._thread = threading.Thread(target=self._run, name="config-watcher", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop watching; returns promptly (a check in progress finishes its reads, nothing waits longer)."""
        self._stopping.set()
        self._wake.set()
        with self._lock:
            thread, observer, self._observer = self._thread, self._observer, None
            self._watches.clear()
        if thread is not None:
            thread.join()
        if observer is not None:
            observer.stop()
            observer.join()

    def watch(self, files: Sequence[Path]) -> None:
        """Replace the set of watched files (a reload may name other secret files).

        A file already watched keeps its last fingerprint; a new one is compared from its content now.
        """
        with self._lock:
            self._files = _absolute(files)
            known = self._fingerprints
            self._fingerprints = {path: known.get(path) or _fingerprint(path) for path in self._files}
            self._schedule()

    def wait_for_checks(self, count: int, timeout: float) -> bool:
        """Block until at least ``count`` checks have completed; False if ``timeout`` passed first."""
        with self._checked:
            return self._checked.wait_for(lambda: self.checks >= count, timeout)

    def _start_observer(self) -> BaseObserver | None:
        try:
            observer = self._observer_factory()
            observer.start()
        except OSError as error:  # e.g. EMFILE: the inotify instance limit is exhausted
            logger.warning("Cannot watch files for events; checking their content periodically instead",
                           extra={"fields": {"error": str(error), "interval_seconds": self._interval}})
            return None
        return observer

    def _schedule(self) -> None:
        """Make the watched directories those of the current files (called with the lock held)."""
        observer = self._observer
        if observer is None:
            return
        wanted = {path.parent for path in self._files}
        for directory in self._watches.keys() - wanted:
            observer.unschedule(self._watches.pop(directory))
        for directory in sorted(wanted - self._watches.keys()):
            try:
                self._watches[directory] = observer.schedule(_Nudge(self._wake), str(directory),
                                                             event_filter=_CONTENT_EVENTS)
            except OSError as error:  # missing directory, or ENOSPC: max_user_watches is exhausted
                if directory not in self._warned:
                    self._warned.add(directory)
                    logger.warning("Cannot watch a directory; checking its files periodically instead",
                                   extra={"fields": {"directory": str(directory), "error": str(error),
                                                     "interval_seconds": self._interval}})

    def _run(self) -> None:
        next_check = time.monotonic() + self._interval
        while True:
            nudged = self._wake.wait(max(0.0, next_check - time.monotonic()))
            if self._stopping.is_set() or (nudged and self._stopping.wait(DEBOUNCE_SECONDS)):
                return
            self._wake.clear()  # before reading: an event during the reads nudges another check
            try:
                self._check()
            except Exception:
                logger.exception("Config file check failed; carrying on")
            next_check = time.monotonic() + self._interval

    def _check(self) -> None:
        with self._lock:
            files = self._files
        # read without the lock: a slow file system must not block watch() on the daemon's loop
        current = _fingerprints(files)
        with self._lock:
            unsettled = bool(self._changed(current))
        if unsettled:
            current = self._settled(files, current)
            if self._stopping.is_set():
                return
        with self._checked:
            changed = self._changed(current)
            self._fingerprints.update((path, current[path]) for path in changed)
            self.checks += 1
            self._checked.notify_all()
        if changed:
            logger.debug("Watched files changed", extra={"fields": {"files": [str(p) for p in changed]}})
            self._on_change()

    def _changed(self, current: dict[Path, str]) -> list[Path]:
        """The files still watched whose fingerprint differs from the last one reported (lock held)."""
        known = self._fingerprints
        return [path for path, seen in current.items() if path in known and known[path] != seen]

    def _settled(self, files: tuple[Path, ...], current: dict[Path, str]) -> dict[Path, str]:
        """The fingerprints once they held still for DEBOUNCE_SECONDS.

        A periodic check has no debounce and may land inside an in-place write; reporting the truncated
        file would apply it (an empty TOML file is valid: every setting back to its default).
        """
        while not self._stopping.wait(DEBOUNCE_SECONDS):
            again = _fingerprints(files)
            if again == current:
                break
            current = again
        return current


def _fingerprints(files: tuple[Path, ...]) -> dict[Path, str]:
    return {path: _fingerprint(path) for path in files}


def _absolute(files: Sequence[Path]) -> tuple[Path, ...]:
    return tuple(dict.fromkeys(path.absolute() for path in files))
