"""Operator commands on the outbox: ``queue``, ``dead``, ``flush``, ``compact``, ``check``.

Postfix's model: list and show read the database read-only (safe beside a running daemon); changes go
to the running daemon over its admin socket (``<data_dir>/admin.sock``, mode 0600), so its one writer
commits them, or, when no daemon runs, through an ``Outbox`` opened here under the data dir's lock.
Emails are shown as short hashes unless ``--show-emails``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from forwarder.client import Client, ForwarderUnavailable
from forwarder.config import Config, parse_duration
from forwarder.errors import ConfigError, ForwarderError
from forwarder.logs import redact
from forwarder.store import (
    Outbox,
    integrity_check,
    list_dead,
    list_queue,
    open_readonly,
    show_dead,
    show_queue,
)
from forwarder.store.admin import change_for

Command = Callable[[argparse.Namespace, Config], int]
Runner = Callable[[argparse.Namespace, dict[str, str]], int]


def add_commands(commands: Any, command: Callable[..., argparse.ArgumentParser],
                 config_of: Callable[[argparse.Namespace, dict[str, str]], Config]) -> None:
    """Register the subcommands; ``command(commands, name, run, help)`` adds the shared settings flags."""
    def _wrap(run: Command) -> Runner:
        return lambda args, environ: run(args, config_of(args, environ))

    queue = command(commands, "queue", None, "inspect and change the backlog").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    _listing(command(queue, "list", _wrap(_queue_list), "list queued messages, oldest first"))
    _show(command(queue, "show", _wrap(_queue_show), "show one queued message"))
    for action, help in (("hold", "set messages aside: not delivered, still kept"), ("release", "undo hold")):
        _target(command(queue, action, _wrap(_change(action)), help), allow_all=True)
    purge = command(queue, "purge", _wrap(_queue_purge), "delete one queued message for good")
    _target(purge, allow_all=False)
    purge.add_argument("--yes", action="store_true", help="do not ask")
    dead = command(commands, "dead", None, "inspect, retry and purge dead letters").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    _listing(command(dead, "list", _wrap(_dead_list), "list dead letters"))
    _show(command(dead, "show", _wrap(_dead_show), "show one dead letter with the API's answer"))
    _target(command(dead, "retry", _wrap(_change("dead_retry")), "put dead letters back in the outbox"),
            allow_all=True)
    dead_purge = command(dead, "purge", _wrap(_dead_purge), "delete dead letters")
    _target(dead_purge, allow_all=True).add_argument(
        "--older-than", metavar="DURATION", help="those dead for longer (e.g. 7d)")
    dead_purge.add_argument("--yes", action="store_true", help="do not ask")
    command(commands, "flush", _wrap(_flush), "retry everything now (forget backoffs)")
    command(commands, "compact", _wrap(_compact), "VACUUM the database to its minimum size")
    command(commands, "check", _wrap(_check), "run SQLite's integrity check (read-only)")


def _listing(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="stable machine-readable output")
    parser.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    parser.add_argument("--show-emails", action="store_true", help="show email addresses in clear")


def _show(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("id", type=int)
    parser.add_argument("--show-emails", action="store_true", help="show email addresses in clear")


def _target(parser: argparse.ArgumentParser, allow_all: bool) -> argparse._MutuallyExclusiveGroup:
    """Exactly one of: an id, or (where allowed) --all; the group, for commands with one more choice."""
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("id", nargs="?", type=int, help="the message id")
    if allow_all:
        group.add_argument("--all", action="store_true", help="every message")
    return group


# -- read-only ------------------------------------------------------------------------------------------

def _read(config: Config, read: Callable[..., Any], *args: Any) -> Any:
    try:
        conn = open_readonly(config.data_dir)
    except FileNotFoundError as e:
        raise ForwarderError(str(e)) from None
    try:
        return read(conn, *args)
    finally:
        conn.close()


def _queue_list(args: argparse.Namespace, config: Config) -> int:
    return _print_rows(args, _read(config, list_queue, 0, args.limit),
                       ("id", "user", "age", "attempts", "next_try", "held", "last_error"))


def _dead_list(args: argparse.Namespace, config: Config) -> int:
    return _print_rows(args, _read(config, list_dead, 0, args.limit),
                       ("id", "user", "age", "reason", "status", "attempts", "response"))


def _queue_show(args: argparse.Namespace, config: Config) -> int:
    return _print_one(args, _read(config, show_queue, args.id), "queued message")


def _dead_show(args: argparse.Namespace, config: Config) -> int:
    return _print_one(args, _read(config, show_dead, args.id), "dead letter")


def _mask(value: Any, show_emails: bool) -> Any:
    return value if show_emails or not isinstance(value, str) else redact(value)


def _masked(row: dict[str, Any], show_emails: bool) -> dict[str, Any]:
    return json.loads(_mask(json.dumps(row), show_emails))  # type: ignore[no-any-return]


def _print_rows(args: argparse.Namespace, rows: list[dict[str, Any]], columns: tuple[str, ...]) -> int:
    rows = [_masked(row, args.show_emails) for row in rows]
    if args.json:
        print(json.dumps(rows, sort_keys=True))
        return 0
    if not rows:
        print("(none)")
        return 0
    now = time.time()
    table = [[_cell(row, column, now) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in table)) for i, column in enumerate(columns)]
    print("  ".join(column.upper().ljust(width) for column, width in zip(columns, widths, strict=True)))
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())
    return 0


def _cell(row: dict[str, Any], column: str, now: float) -> str:
    if column == "age":
        return _duration(now - row["enqueued_at"])
    if column == "next_try":  # "due": its own wait is over; a busy window or the endpoint's backoff may hold it
        next_try = row.get("next_attempt")
        if next_try is None or row.get("held"):
            return "-"
        return "due" if next_try <= now else f"in {_duration(next_try - now)}"
    value = row.get(column)
    text = "-" if value is None or value == "" else str(value)
    return text if len(text) <= 48 else text[:45] + "..."


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.1f}s"


def _print_one(args: argparse.Namespace, row: dict[str, Any] | None, what: str) -> int:
    if row is None:
        raise ForwarderError(f"no {what} with id {args.id}")
    print(json.dumps(_masked(row, args.show_emails), indent=2, sort_keys=True))
    return 0


def _check(args: argparse.Namespace, config: Config) -> int:
    problems = _read(config, integrity_check)
    if problems == ["ok"]:
        print("ok: integrity check passed")
        return 0
    for line in problems:
        print(line)
    return 1


# -- changes --------------------------------------------------------------------------------------------

def _change(op: str) -> Command:
    def run(args: argparse.Namespace, config: Config) -> int:
        request = {"op": op, "id": args.id, "all": bool(getattr(args, "all", False))}
        print(f"{op}: {_apply(config, request)} message(s)")
        return 0
    return run


def _confirm(args: argparse.Namespace, question: str) -> None:
    if args.yes:
        return
    if not sys.stdin.isatty():
        raise ForwarderError(f"{question}: pass --yes to confirm (stdin is not a terminal)")
    if input(f"{question} [y/N] ").strip().lower() not in ("y", "yes"):
        raise ForwarderError("not confirmed; nothing changed")


def _queue_purge(args: argparse.Namespace, config: Config) -> int:
    _confirm(args, f"Delete queued message {args.id} for good")
    print(f"purge: {_apply(config, {'op': 'purge', 'id': args.id})} message(s)")
    return 0


def _dead_purge(args: argparse.Namespace, config: Config) -> int:
    request: dict[str, Any] = {"op": "dead_purge", "id": args.id, "all": args.all}
    if args.older_than is not None:
        request = {"op": "dead_purge", "older_than": _older_than(args.older_than)}
    _confirm(args, "Delete these dead letters for good")
    print(f"dead purge: {_apply(config, request)} message(s)")
    return 0


def _older_than(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as e:
        raise ConfigError("--older-than", "command line", str(e)) from None


def _flush(args: argparse.Namespace, config: Config) -> int:
    _apply(config, {"op": "flush"})
    print("flush: the daemon retries everything now")
    return 0


def _compact(args: argparse.Namespace, config: Config) -> int:
    _apply(config, {"op": "compact"})
    print("compact: done")
    return 0


def _apply(config: Config, request: dict[str, Any]) -> int:
    """Through the running daemon if there is one, else directly under the data dir's lock."""
    try:
        with Client(str(config.admin_socket), timeout=600.0) as client:
            return int(client.request(request)["count"])
    except ForwarderUnavailable:
        pass
    if not (config.data_dir / "outbox.db").exists():
        raise ForwarderError(f"no outbox in {config.data_dir}")
    if request["op"] == "flush":
        raise ForwarderError("no daemon is running; the next start delivers everything at once")
    with Outbox(config.data_dir) as outbox:
        future = outbox.compact() if request["op"] == "compact" else outbox.admin(change_for(request))
        return future.result()
