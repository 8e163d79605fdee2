"""Space held back on the data volume for removals, so that a full volume can still empty itself."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)
RESERVE_FILE = "outbox.reserve"
RESERVE_BYTES = 4 << 20  # a WAL at its journal_size_limit: room for removals when the volume is full


class Reserve:
    """Space held back on the data volume, so that delivered messages can be removed when it is full.

    A removal writes to the WAL like an insert does: on a full volume, without room, delivered messages
    could never leave the outbox and the volume would never empty. The reserve is a preallocated file
    beside the database. A commit with removals that fails for a full disk releases it and is retried;
    until there is room to set it aside again, new messages are refused with ``full``, so they cannot eat it.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self.held = path.exists()
        self._unsupported = False  # the volume cannot preallocate: no reserve, and ingest is not held back

    def take(self, free: int) -> bool:
        """Set the reserve aside unless it is, if ``free`` bytes leave room for it; False when it is not."""
        if self.held or self._unsupported:
            return True
        if free < 2 * RESERVE_BYTES:
            return False
        partial = self._path.with_suffix(".partial")
        try:
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
            try:
                os.posix_fallocate(fd, 0, RESERVE_BYTES)
            finally:
                os.close(fd)
            os.replace(partial, self._path)
        except OSError as e:
            partial.unlink(missing_ok=True)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                return False
            self._unsupported = True
            logger.warning("Cannot set a reserve aside on the data volume; when it fills up, delivered "
                           "messages stay in the outbox until space is freed",
                           extra={"fields": {"error": str(e)}})
            return True
        self.held = True
        return True

    def release(self) -> bool:
        """Give the reserve's space to SQLite; False if it was not held."""
        if not self.held:
            return False
        self._path.unlink(missing_ok=True)
        self.held = False
        return True
