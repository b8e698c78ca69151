"""How a run ended, and the exit code each outcome gives (`pretrain train`, the worker, the launchers)."""

from __future__ import annotations

from enum import Enum


class RunStatus(str, Enum):
    FINISHED = "finished"
    ALREADY_FINISHED = "already_finished"
    PREEMPTED = "preempted"
    """A checkpoint was committed after SIGTERM: run the same command again to resume."""
    FAILED = "failed"
    """An error a restart would not fix (config, data, lease, diverged loss...)."""

    @property
    def exit_code(self) -> int:
        return {"finished": 0, "already_finished": 0, "preempted": 75, "failed": 2}[self.value]


def exit_code(status: str) -> int:
    """Exit code of a summary's status string (1 for anything unknown)."""
    try:
        return RunStatus(status).exit_code
    except ValueError:
        return 1
