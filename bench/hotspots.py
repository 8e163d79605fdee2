"""Where the daemon's time goes (issue 8, item 6): py-spy samples of the real daemon under each bench load.

For each scenario the daemon runs as in the other benches; ``py-spy record`` (pip install py-spy; needs
ptrace rights over the daemon, e.g. root or kernel.yama.ptrace_scope=0) samples it without pausing it while
the load runs, once counting only the thread that holds the GIL (CPU in Python) and once every busy
thread. The report gives the sample count against what the sampling rate allows (near 100 % in GIL mode
means the GIL is saturated), each thread's share of the samples, the hottest leaf frames (self time) and
the hottest functions including their callees. ``--out DIR`` keeps the raw collapsed stacks for a flame graph.

Scenarios: ``per-request`` (connect, one set, close, in a loop), ``concurrent`` (64 producers, one message
outstanding each), ``fill`` (pipelined, 4 connections), ``drain`` (to the local API, concurrency 8).

    python bench/hotspots.py [--scenarios per-request concurrent fill drain] [--seconds 5] [--out DIR]
"""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import harness
from concurrency import _ours_generator, run_round
from harness import Daemon, FakeApi, fill, machine, table, workdir

from forwarder.client import Client

_LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")
_FRAME_LINE = re.compile(r":\d+\)$")


def _py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise SystemExit("py-spy is not installed (pip install py-spy)")
    return found


def record(pid: int, seconds: float, out: Path, rate: int, gil: bool) -> subprocess.Popen[bytes]:
    """Sample ``pid``: with ``gil`` only the thread holding the GIL (CPU in Python), else every busy one."""
    return subprocess.Popen([_py_spy(), "record", "--pid", str(pid), "--duration", str(int(seconds)),
                             "--rate", str(rate), "--format", "raw", "--threads", "--nonblocking",
                             *(["--gil"] if gil else []), "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def report(raw: Path, top: int, expected: float) -> str:
    """Thread shares, top self frames and top inclusive functions of one collapsed-stack file."""
    threads: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        match = _LINE.match(line)
        if match is None:
            continue
        count = int(match["count"])
        thread, *frames = match["stack"].split(";")
        total += count
        threads[_thread_name(thread)] += count
        if frames:
            leaves[frames[-1]] += count
        for function in {_FRAME_LINE.sub(")", frame) for frame in frames}:
            inclusive[function] += count
    if not total:
        return "no samples"

    def pct(count: int) -> str:
        return f"{100 * count / total:.1f} %"

    busy = [(f, c) for f, c in inclusive.most_common() if not _is_plumbing(f)][:top]
    return "\n\n".join([
        f"{total} samples, {100 * total / expected:.0f} % of the {expected:.0f} the sampling period allows",
        table(["thread", "share"], [[name, pct(c)] for name, c in threads.most_common()]),
        "Self time (leaf frames):\n\n" + table(["frame", "share"],
                                                 [[f, pct(c)] for f, c in leaves.most_common(top)]),
        "Including callees:\n\n" + table(["function", "share"], [[f, pct(c)] for f, c in busy]),
    ])


def _thread_name(thread: str) -> str:
    """``thread (1234): send-3`` -> ``send-N``: worker threads are counted together."""
    return re.sub(r"-\d+$", "-N", thread.split(": ", 1)[-1])


_PLUMBING = ("Thread.", "_run_module_as_main", "_run_code", "<module>", "run (asyncio", "Runner.run",
             "BaseEventLoop.run_forever", "BaseEventLoop.run_until_complete", "main (forwarder/cli.py)",
             "_serve (forwarder/cli.py)", "serve (forwarder/daemon.py)")


def _is_plumbing(frame: str) -> bool:
    """Frames every sample of a thread sits under (bootstraps, the loop's run_forever) say nothing."""
    return frame.startswith(_PLUMBING)


def per_request(daemon: Daemon, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        with Client(str(daemon.socket)) as client:
            client.set(f"user{n}@example.com", {"plan": "pro"})
        n += 1


def concurrent(daemon: Daemon, seconds: float) -> None:
    run_round(_ours_generator, str(daemon.socket), 64, seconds, daemon.pid, 2)


def pipelined(daemon: Daemon, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    workers = [threading.Thread(target=_fill_until, args=(daemon, deadline, k)) for k in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def _fill_until(daemon: Daemon, deadline: float, k: int) -> None:
    batch = 0
    while time.monotonic() < deadline:
        fill(daemon.socket, 2000, first=(k * 1000 + batch) * 2000)
        batch += 1


_MODES = {"gil": "samples of the thread holding the GIL (CPU spent running Python)",
          "busy": "samples of every thread not idle (includes time blocked in fsync and in the kernel)"}
Load = Callable[[Daemon, float], None]
_LOADS: dict[str, Load] = {"per-request": per_request, "concurrent": concurrent, "fill": pipelined}


def profile_load(work: Path, name: str, seconds: float, rate: int, out: Path, gil: bool) -> str:
    with Daemon(work / out.stem) as daemon:
        _LOADS[name](daemon, 0.5)  # warm-up
        spy = record(daemon.pid, seconds, out, rate, gil)
        time.sleep(0.3)  # let py-spy attach before the load starts
        _LOADS[name](daemon, seconds)
        _, errors = spy.communicate(timeout=60)
    return errors.decode(errors="replace")


def profile_drain(work: Path, seconds: float, rate: int, out: Path, gil: bool) -> str:
    with FakeApi(work / out.stem) as api:
        with Daemon(work / out.stem) as builder:
            fill(builder.socket, 30000)
        daemon = Daemon(work / out.stem, api_url=api.url, ca_file=api.ca_file)
        with daemon:
            time.sleep(0.5)
            spy = record(daemon.pid, seconds, out, rate, gil)
            _, errors = spy.communicate(timeout=60)
    return errors.decode(errors="replace")


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--scenarios", nargs="+", default=["per-request", "concurrent", "fill", "drain"],
                        choices=["per-request", "concurrent", "fill", "drain"])
    parser.add_argument("--modes", nargs="+", default=list(_MODES), choices=list(_MODES))
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rate", type=int, default=250, help="samples per second")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--out", help="keep the raw collapsed stacks here (one .txt per scenario)")
    args = parser.parse_args()

    with workdir("hotspots", args.work_dir) as work:
        out_dir = Path(args.out) if args.out else work
        out_dir.mkdir(parents=True, exist_ok=True)
        print(machine())
        for name in args.scenarios:
            for mode in args.modes:
                raw = out_dir / f"{name}-{mode}.txt"
                if name == "drain":
                    errors = profile_drain(work, args.seconds, args.rate, raw, mode == "gil")
                else:
                    errors = profile_load(work, name, args.seconds, args.rate, raw, mode == "gil")
                print(f"\n## {name}: {_MODES[mode]}\n", flush=True)
                expected = args.rate * int(args.seconds)
                print(report(raw, args.top, expected) if raw.exists() else f"py-spy failed: {errors[-2000:]}")


if __name__ == "__main__":
    main()
