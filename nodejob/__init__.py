"""nodejob: reattachable background jobs for node-graph workflows.

The embedding names (``JobExecutionManager``, ``RunJobRequest``, ``ProcessingContext``, ...)
are importable from here, lazily: importing ``nodejob`` alone loads nothing else, which keeps
the worker bundle free of the server's dependencies.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "JobExecutionManager": "nodejob.manager",
    "open_manager": "nodejob.manager",
    "CancelResult": "nodejob.manager",
    "RunJobRequest": "nodejob.protocol",
    "ProcessingContext": "nodejob.protocol",
    "JobStatus": "nodejob.protocol",
    "Config": "nodejob.config",
    "Store": "nodejob.store",
    "MessageLog": "nodejob.log",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'nodejob' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
