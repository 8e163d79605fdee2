"""Drain rate to the local Turret.IO-compatible API (issue 8, item 4), against concurrency / round trip.

A backlog is built once with the daemon running without credentials (so nothing drains), then copied for
every run. Each run starts the daemon on its copy with credentials, ``--concurrency C`` and the local HTTPS
API (``forwarder fake-api``, its own process) answering after an added delay. After a warm-up, the messages
the API received in a fixed window (its own receive timestamps) give the rate. The ideal is C divided by
the round trip of one signed keep-alive request, measured by this script against the same API and delay.
The last column, messages per second of daemon CPU, is the rate one core's worth of daemon could reach:
where it is below the ideal, the daemon's CPU per request (not the API round trip) is the limit.

    python bench/drain.py [--delays 0 0.05] [--concurrency 1 8 32 128] [--seconds 3] [--rounds 3]
"""

from __future__ import annotations

import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import harness
import requests
from harness import (
    CREDENTIALS,
    Daemon,
    FakeApi,
    Spread,
    cpu_seconds,
    draining_daemon,
    filesystem_of,
    fill,
    machine,
    table,
    workdir,
)

from forwarder.message import Kind, Message, QueuedMessage
from forwarder.turretio import Credentials, TurretUpstream

_WARMUP = 1.0


def round_trip(api: FakeApi, samples: int = 40) -> float:
    """Median seconds of one signed POST on a kept-alive TLS connection, as the flusher sends them."""
    upstream = TurretUpstream()
    credentials = Credentials.from_base64(CREDENTIALS["TURRET_API_KEY"], CREDENTIALS["TURRET_API_SECRET"])
    times = []
    with requests.Session() as session:
        for n in range(samples + 3):
            message = Message(Kind.SET, {"email": f"probe{n}@example.com", "attributes": {"plan": "pro"},
                                         "properties": {}})
            queued = QueuedMessage(n + 1, message, time.time())
            request = upstream.build_request(queued, credentials, time.time())
            started = time.perf_counter()
            response = session.post(api.url + request.path, data=request.body, headers=request.headers,
                                    verify=api.ca_file, timeout=30)
            if response.status_code != 200:
                raise RuntimeError(f"the local API answered {response.status_code} to a signed probe")
            times.append(time.perf_counter() - started)
    return statistics.median(times[3:])  # the first ones pay the TLS handshake


@dataclass(frozen=True, slots=True)
class Run:
    rate: float
    daemon_cpu: float
    api_cpu: float


def drain_once(work: Path, template: Path, api: FakeApi, concurrency: int, seconds: float) -> Run:
    """Start the daemon on a fresh copy of the backlog and count what the API receives in the window."""
    daemon = draining_daemon(work, template, api, concurrency)
    with daemon:
        start = time.monotonic() + _WARMUP
        time.sleep(max(0.0, start - time.monotonic()))
        daemon_before, api_before = cpu_seconds(daemon.pid), cpu_seconds(api.pid)
        time.sleep(seconds)
        daemon_cpu, api_cpu = cpu_seconds(daemon.pid) - daemon_before, cpu_seconds(api.pid) - api_before
        left = daemon.status()["backlog"]
    if left == 0:
        raise RuntimeError("the backlog ran out before the window closed: raise --backlog")
    arrivals = [r["at"] for r in api.received() if 200 <= r["status"] < 300]
    in_window = sum(1 for at in arrivals if start <= at < start + seconds)
    shutil.rmtree(daemon.data_dir.parent, ignore_errors=True)
    return Run(in_window / seconds, daemon_cpu / seconds, api_cpu / seconds)


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--delays", type=float, nargs="+", default=[0.0, 0.05], help="added API latency, s")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--seconds", type=float, default=3.0, help="length of the measured window")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backlog", type=int, default=20000, help="messages in the backlog at each start")
    args = parser.parse_args()

    rows = []
    with workdir("drain", args.work_dir) as work, FakeApi(work) as api:
        print(f"{machine()}\nData dir on: {filesystem_of(work)}")
        with Daemon(work / "template") as builder:
            fill(builder.socket, args.backlog)
        template = work / "template" / "data"
        for delay in args.delays:
            api.set_delay(delay)
            rtt = round_trip(api)
            for concurrency in args.concurrency:
                runs = [drain_once(work, template, api, concurrency, args.seconds)
                        for _ in range(args.rounds)]
                ideal = concurrency / rtt
                rows.append([f"{delay * 1000:g}", str(concurrency), f"{rtt * 1000:.2f}", f"{ideal:.0f}",
                             Spread.of([r.rate for r in runs]).show(digits=0),
                             Spread.of([r.rate / ideal for r in runs]).show(100, 0) + " %",
                             f"{statistics.median(r.daemon_cpu for r in runs):.0%}",
                             f"{statistics.median(r.api_cpu for r in runs):.0%}",
                             f"{statistics.median(r.rate / r.daemon_cpu for r in runs if r.daemon_cpu):.0f}"])
                print(" | ".join(rows[-1]), flush=True)
    print(f"\nDrain to the local API: messages/s in a {args.seconds:g} s window after {_WARMUP:g} s warm-up, "
          f"median over {args.rounds} runs (min-max)\n")
    print(table(["added delay ms", "concurrency", "round trip ms", "ideal msg/s", "msg/s", "of ideal",
                 "daemon CPU", "API CPU", "msg per daemon CPU-s"], rows))


if __name__ == "__main__":
    main()
