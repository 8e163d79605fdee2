"""Before and after in one run: two checkouts of the forwarder, side by side, rounds interleaved.

Figures from runs of this VM hours apart drifted by a quarter or more (the floors in ``bench/README.md``
show it), so a change is judged by ratios taken within one run. Each tree's daemon runs from that tree
(``PYTHONPATH``); both are up for the whole run, and the rounds alternate which goes first. Per round:
per-request and long-lived ack p50 (``ack_latency.py``'s patterns), then throughput at each producer
count (``concurrency.py``'s generator). Printed: each tree's median, and the median of the per-round
ratios (before / after for latency, after / before for throughput: above 1 means the second tree is better).

    git worktree add /tmp/before <commit>
    python bench/ab.py /tmp/before . [--rounds 6] [--producers 16 64 256]
"""

from __future__ import annotations

import statistics
from pathlib import Path

import harness
from ack_latency import ours_long_lived, ours_per_request
from concurrency import _ours_generator, run_round
from harness import Daemon, machine, percentile, table, workdir


def _ratio(first: list[float], second: list[float]) -> str:
    ratios = [a / b for a, b in zip(first, second, strict=True)]
    return f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("before", type=Path, help="the tree whose forwarder/ runs first")
    parser.add_argument("after", type=Path, help="the tree whose forwarder/ is compared with it")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=1000, help="per-request acks per round")
    parser.add_argument("--sequential", type=int, default=2000, help="long-lived acks per round")
    parser.add_argument("--producers", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    trees = [args.before.resolve(), args.after.resolve()]
    figures = ["per request p50 ms", "long-lived p50 ms", *(f"{n} producers msg/s" for n in args.producers)]
    results: list[dict[str, list[float]]] = [{name: [] for name in figures} for _ in trees]

    print(machine())
    with workdir("ab", args.work_dir) as work:
        daemons = []
        for n, tree in enumerate(trees):
            daemon = Daemon(work / f"tree{n}", extra=["--max-backlog-messages", "100000000"])  # never drained
            daemon.env["PYTHONPATH"] = str(tree)
            daemons.append(daemon.start())
        try:
            for round_number in range(args.rounds):
                for n in (0, 1) if round_number % 2 == 0 else (1, 0):
                    daemon, got = daemons[n], results[n]
                    got[figures[0]].append(1000 * percentile(ours_per_request(daemon.socket)(args.requests), 0.5))
                    got[figures[1]].append(1000 * percentile(ours_long_lived(daemon.socket)(args.sequential), 0.5))
                    for name, producers in zip(figures[2:], args.producers, strict=True):
                        got[name].append(run_round(_ours_generator, str(daemon.socket), producers, args.seconds,
                                                   daemon.pid, min(2, producers)).throughput)
        finally:
            for daemon in daemons:
                daemon.stop()

    print(f"\nbefore: {trees[0]}\nafter: {trees[1]}\nmedian over {args.rounds} interleaved rounds; ratio: "
          "median of the per-round ratios (min-max), above 1 = after is better\n")
    rows = []
    for name in figures:
        before, after = results[0][name], results[1][name]
        better = _ratio(before, after) if name.endswith("ms") else _ratio(after, before)
        rows.append([name, f"{statistics.median(before):.3f}", f"{statistics.median(after):.3f}", better])
    print(table(["figure", "before", "after", "ratio"], rows))


if __name__ == "__main__":
    main()
