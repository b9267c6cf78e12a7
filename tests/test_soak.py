"""The soak, short in CI; ``NODEJOB_SOAK_MINUTES=60`` makes it a long one.

``tests/soak.py`` runs a real server under a continuous mixed load and checks every promise
all along (each reattach continues at exactly ``after_seq + 1``, no 5xx, no traceback, exit
status 0). CI runs it for one minute so that it never rots; the long runs recorded in
docs/guarantees.md are the same code for longer, with ``--cleanup-s`` so that the registry
cleanup and the message retention pass many times.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

from tests import soak

if TYPE_CHECKING:
    from pathlib import Path

MINUTES = float(os.environ.get("NODEJOB_SOAK_MINUTES", "1"))


def test_a_soak_under_mixed_load_breaks_no_promise(tmp_path: Path) -> None:
    report = tmp_path / "soak.json"
    argv = ["--minutes", str(MINUTES), "--home", str(tmp_path), "--report", str(report)]
    argv += ["--cleanup-s", "20", "--seed", os.environ.get("NODEJOB_SOAK_SEED", "7")]
    code = soak.main(argv)
    summary = json.loads(report.read_text())["summary"]
    print(f"\nFIGURES soak: {json.dumps(summary)}")
    assert summary["violations"] == []
    assert summary["tracebacks_in_server_log"] == 0
    assert summary["exit_status"] == 0
    assert summary["jobs_started"] > 0
    assert summary["messages_checked"] > 0
    assert code == 0
