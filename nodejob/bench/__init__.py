"""``nodejob bench``: speed and memory of a real server, measured end to end.

Each benchmark starts a real server in this process (``nodejob.server.app.serve`` on
127.0.0.1:0, a fresh temporary home) and drives it the way clients do: trio-websocket over
loopback, or the manager directly where the figure is about the server alone. The yardstick
for streaming is bare trio-websocket in the same process. docs/benchmarks.md explains every
figure, its target and the latest results. This package belongs to the CLI: it imports the
server, never the other way round.

harness.py   a real server, a strict /ws client, the graphs and sizes
stream.py    the message path: stream (vs bare trio-websocket), replay, multi
jobs.py      jobs themselves: trivial, concurrent (RSS per job), subprocess, docker
report.py    the figures and targets; the JSON object and the table
runner.py    arguments, running each group on a fresh server, main
"""

from __future__ import annotations

from nodejob.bench.report import FIGURES, GROUPS, OPTIONAL_GROUPS
from nodejob.bench.runner import main

__all__ = ["FIGURES", "GROUPS", "OPTIONAL_GROUPS", "main"]
