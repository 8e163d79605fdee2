"""Watch the config file and the secret files; report a content change (placeholder, see issue 6)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path


class ConfigWatcher:
    """Calls ``on_change`` (from its own thread) when a watched file's content changes."""

    def __init__(self, files: Sequence[Path], on_change: Callable[[], None], interval: float) -> None:
        self._files = list(files)
        self._on_change = on_change
        self._interval = interval

    def start(self) -> None:
        """Begin watching."""

    def stop(self) -> None:
        """Stop watching; returns promptly."""

    def watch(self, files: Sequence[Path]) -> None:
        """Replace the set of watched files (a reload may name other secret files)."""
        self._files = list(files)
