"""``nodejob bench``: its arguments, and running each benchmark group on a fresh server.

A benchmark that fails (or an optional strategy that cannot run here) becomes null figures
with a reason; `main` exits 1 if a benchmark failed.

Part of ``nodejob bench`` (docs/benchmarks.md explains every figure). The bench imports
the server; nothing outside nodejob.bench imports it but the CLI's lazy ``bench`` handler.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Final

import trio

from nodejob.bench.harness import FULL, QUICK, Results, Sizes, Unavailable
from nodejob.bench.jobs import (
    bench_concurrent,
    bench_docker,
    bench_ray,
    bench_subprocess,
    bench_trivial,
)
from nodejob.bench.report import FIGURES, GROUPS, OPTIONAL_GROUPS, Report, as_json, print_table
from nodejob.bench.stream import bench_multi, bench_replay, bench_stream
from nodejob.protocol import EXIT_USAGE

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

BENCH_TIMEOUT_S: Final = 900.0
"""Bound on any one benchmark, so a broken server fails the run instead of hanging it."""

BENCHES: Final[dict[str, Callable[[Path, Sizes, Callable[[str], None]], Awaitable[Results]]]] = {
    "stream": bench_stream,
    "trivial": bench_trivial,
    "replay": bench_replay,
    "concurrent": bench_concurrent,
    "multi": bench_multi,
    "subprocess": bench_subprocess,
    "docker": bench_docker,
    "ray": bench_ray,
}


async def run_benches(
    groups: list[str], sizes: Sizes, root: Path, report: Callable[[str], None]
) -> Report:
    """Run each group on its own fresh server; a failure becomes nulls with a reason."""
    result = Report({}, {}, {})
    for group in groups:
        keys = [key for key, g, _ in FIGURES if g == group]
        try:
            with trio.fail_after(BENCH_TIMEOUT_S):
                figures = await BENCHES[group](root / group, sizes, report)
        except Exception as exc:
            reason = _describe(exc)
            if not isinstance(exc, Unavailable) and group not in OPTIONAL_GROUPS:
                result.failed = True
            for key in keys:
                result.figures[key] = None
                result.notes[key] = reason
            continue
        result.details.update(figures.pop("details", {}))
        result.figures.update({key: figures[key] for key in keys})
    order = [key for key, _, _ in FIGURES]
    result.figures = dict(sorted(result.figures.items(), key=lambda item: order.index(item[0])))
    return result


def _describe(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, trio.TooSlowError):
        return f"did not finish within {BENCH_TIMEOUT_S:g} s"
    return f"{type(exc).__name__}: {exc}" if not isinstance(exc, Unavailable) else str(exc)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="nodejob bench",
        description="Measure a real in-process server on loopback (temporary home).",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="small counts (for tests)")
    parser.add_argument(
        "--only",
        metavar="NAME,...",
        help=f"benchmarks ({', '.join(GROUPS)}) or figure names to run",
    )
    args = parser.parse_args(argv)
    groups = list(GROUPS)
    if args.only:
        by_key = {key: group for key, group, _ in FIGURES}
        wanted = set()
        for name in (n.strip() for n in args.only.split(",") if n.strip()):
            if name not in GROUPS and name not in by_key:
                parser.error(f"--only: unknown benchmark {name!r}")
            wanted.add(by_key.get(name, name))
        groups = [group for group in GROUPS if group in wanted]
    args.groups = groups
    return args


def main(argv: list[str]) -> int:
    """``nodejob bench [--json] [--quick] [--only NAME,...]``; 0 if every benchmark ran,
    1 if one failed, 2 for a usage error, 130 on Ctrl-C."""
    from rich.console import Console

    try:
        args = parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    sizes = QUICK if args.quick else FULL
    progress = Console(stderr=True)
    try:
        with tempfile.TemporaryDirectory(prefix="nodejob-bench-") as root:
            if progress.is_terminal:
                with progress.status("starting", refresh_per_second=4) as status:
                    report = trio.run(run_benches, args.groups, sizes, Path(root), status.update)
            else:

                def line(text: str) -> None:
                    print(f"bench: {text}", file=sys.stderr, flush=True)

                report = trio.run(run_benches, args.groups, sizes, Path(root), line)
    except KeyboardInterrupt:
        return 130
    if args.json:
        print(json.dumps(as_json(report, sizes, args.quick), ensure_ascii=False))
    else:
        print_table(report, args.quick, Console())
    return 1 if report.failed else 0
