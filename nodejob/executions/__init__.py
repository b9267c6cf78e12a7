"""Execution strategies: where a job's graph runs. Each is imported only when first used,
so the server does not load the Docker SDK until a docker job asks for it."""

from __future__ import annotations

import importlib

from nodejob.executions.base import ExecutionUnavailable, JobExecution, Outcome
from nodejob.protocol import ExecutionStrategy

__all__ = ["ExecutionUnavailable", "JobExecution", "Outcome", "execution_class"]

_MODULES = {
    ExecutionStrategy.THREADED: ("nodejob.executions.threaded", "ThreadedExecution"),
    ExecutionStrategy.SUBPROCESS: ("nodejob.executions.process", "SubprocessExecution"),
    ExecutionStrategy.DOCKER: ("nodejob.executions.container", "DockerExecution"),
    ExecutionStrategy.RAY: ("nodejob.executions.ray", "RayExecution"),
}


def execution_class(strategy: ExecutionStrategy) -> type[JobExecution]:
    """The JobExecution class of ``strategy``; ExecutionUnavailable if it is not built in."""
    module_name, class_name = _MODULES[strategy]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        raise ExecutionUnavailable(
            f"execution strategy {strategy.value!r} is not available in this build"
        ) from None
    cls: type[JobExecution] = getattr(module, class_name)
    return cls
