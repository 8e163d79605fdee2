"""The ``turret-forwarder`` command: argparse subcommands, exit codes, and the one top-level catch.

A ``ForwarderError`` prints one line and exits with its status; anything else prints a traceback, because
it is a bug. Nothing imports this module.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from forwarder import __version__, admin
from forwarder.client import Client, ForwarderUnavailable
from forwarder.config import Config, add_arguments, load_config
from forwarder.errors import AlreadyRunning, ConfigError, ForwarderError, Refused

EXIT_OK = 0
EXIT_FAILURE = 1  # the command ran and the answer is "no" (unhealthy, refused, ...)
EXIT_USAGE = 2  # bad flag or setting
EXIT_ALREADY_RUNNING = 3

_CONNECTION_SETTINGS = ("socket", "data_dir")
_NOT_SETTINGS = frozenset({"run", "command", "action", "id", "all", "json", "limit", "show_emails", "yes",
                           "older_than", "email", "attr", "prop", "key", "fake_args"})


def main(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> int:
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "fake-api":
        args.fake_args = rest  # its own parser reads them (REMAINDER would refuse any leading option)
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    environ = dict(os.environ) if environ is None else environ
    try:
        result: int = args.run(args, environ)
        return result
    except ConfigError as e:
        print(f"turret-forwarder: bad setting: {e}", file=sys.stderr)
        return EXIT_USAGE
    except AlreadyRunning as e:
        print(f"turret-forwarder: {e}", file=sys.stderr)
        return EXIT_ALREADY_RUNNING
    except ForwarderError as e:
        print(f"turret-forwarder: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE
    except BrokenPipeError:  # `... | head`: the reader left; not an error worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE


def _exit_now(signum: int, frame: object) -> None:
    raise SystemExit(EXIT_OK)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="turret-forwarder", description=(
        "A local, durable buffer between web apps and the Turret.IO API: apps send to a Unix socket and get "
        "an ack once the message is on disk; the daemon delivers to the API, retrying through outages."))
    parser.add_argument("--version", action="version", version=f"turret-forwarder {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _command(commands, "serve", _serve, "run the daemon in the foreground", settings=None)
    send = _command(commands, "send", _send, "send one message (or JSON request lines from stdin)")
    send.add_argument("--email", help="the user to create or update; without it, read request lines from stdin")
    send.add_argument("--attr", action="append", default=[], metavar="K=V", help="an attribute (repeatable)")
    send.add_argument("--prop", action="append", default=[], metavar="K=V", help="a property (repeatable)")
    send.add_argument("--key", help="idempotency key: the same key is stored once")
    status = _command(commands, "status", _status, "backlog figures (daemon running or not; read-only)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    _command(commands, "health", _health, "exit 0 if the daemon answers ping, else 1 with the reason")
    admin.add_commands(commands, _command, config_of)
    demo = commands.add_parser("demo", help="run the whole job end to end locally (under a minute)")
    demo.set_defaults(run=_demo)
    fake = commands.add_parser("fake-api", help="run a local Turret.IO-compatible HTTPS server",
                               add_help=False)
    fake.set_defaults(run=_fake_api)
    return parser


def _command(commands: Any, name: str, run: Callable[[argparse.Namespace, dict[str, str]], int] | None,
             help: str, settings: Sequence[str] | None = _CONNECTION_SETTINGS) -> argparse.ArgumentParser:
    """A subcommand with the settings flags it needs; ``run=None`` for a group of subcommands."""
    parser: argparse.ArgumentParser = commands.add_parser(name, help=help, description=help)
    if run is not None:
        add_arguments(parser, settings)
        parser.set_defaults(run=run)
    return parser


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k not in _NOT_SETTINGS}


def config_of(args: argparse.Namespace, environ: dict[str, str]) -> Config:
    """The settings a command runs with: its flags over the environment over the file."""
    return load_config(_flags(args), environ)


def _serve(args: argparse.Namespace, environ: dict[str, str]) -> int:
    # As PID 1 in a container, a signal with no handler is ignored: until the daemon's loop installs its
    # own, SIGTERM must still end the process (nothing is acked before then, so nothing can be lost).
    signal.signal(signal.SIGTERM, _exit_now)
    from forwarder.daemon import serve

    serve(_flags(args), environ)
    return EXIT_OK


def _send(args: argparse.Namespace, environ: dict[str, str]) -> int:
    config = config_of(args, environ)
    with Client(str(config.socket)) as client:
        if args.email:
            message_id = client.set(args.email, _pairs(args.attr, "--attr"), _pairs(args.prop, "--prop"),
                                    key=args.key)
            print(json.dumps({"ok": True, "id": message_id}))
            return EXIT_OK
        return _send_lines(client, sys.stdin)


def _send_lines(client: Client, lines: Any) -> int:
    """Send each non-empty stdin line as one request; print each reply; fail if any was refused."""
    status = EXIT_OK
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            reply = client.request(request)
        except json.JSONDecodeError as e:
            reply, status = {"ok": False, "error": "invalid", "detail": f"line {number}: {e}"}, EXIT_FAILURE
        except Refused as e:
            reply, status = {"ok": False, "error": e.code, "detail": f"line {number}: {e}"}, EXIT_FAILURE
        print(json.dumps(reply), flush=True)
    return status


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(flag, "command line", f"expected KEY=VALUE, got {item!r}")
        pairs[key] = value
    return pairs


def _status(args: argparse.Namespace, environ: dict[str, str]) -> int:
    from forwarder.store import open_readonly, read_stats

    config = config_of(args, environ)
    try:
        conn = open_readonly(config.data_dir)
    except FileNotFoundError as e:
        raise ForwarderError(f"{e} (has serve ever run with --data-dir {config.data_dir}?)") from None
    try:
        stats = read_stats(conn)
    finally:
        conn.close()
    oldest = stats.oldest_enqueued_at
    report: dict[str, Any] = {
        "backlog": stats.messages, "bytes": stats.bytes, "dead_letters": stats.dead_letters,
        "oldest_age_seconds": round(max(0.0, time.time() - oldest), 3) if oldest is not None else 0.0,
        "daemon": "stopped", "delivery_state": None, "credentials": None}
    report.update(_daemon_status(config.socket) or _daemon_status(config.admin_socket))
    if args.json:
        print(json.dumps(report, sort_keys=True))
    else:
        for key, value in report.items():
            print(f"{key:>20}: {'-' if value is None else value}")
    return EXIT_OK


def _daemon_status(socket_path: Path) -> dict[str, Any]:
    """The running daemon's own view (delivery state, credentials), or nothing if it is not running."""
    try:
        with Client(str(socket_path), timeout=2.0) as client:
            reply = client.request({"op": "status"})
    except (ForwarderUnavailable, Refused):
        return {}
    return {"daemon": "running", "delivery_state": reply.get("delivery_state"),
            "credentials": "present" if reply.get("credentials") else "missing"}


def _health(args: argparse.Namespace, environ: dict[str, str]) -> int:
    config = config_of(args, environ)
    try:
        with Client(str(config.socket), timeout=2.0) as client:
            client.ping()
    except (ForwarderUnavailable, Refused) as e:
        print(f"unhealthy: {e}", file=sys.stderr)
        return EXIT_FAILURE
    print("ok")
    return EXIT_OK


def _demo(args: argparse.Namespace, environ: dict[str, str]) -> int:
    from forwarder.demo import run_demo

    return run_demo()


def _fake_api(args: argparse.Namespace, environ: dict[str, str]) -> int:
    from forwarder import fakeapi

    return fakeapi.main(args.fake_args)
