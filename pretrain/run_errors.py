"""Errors that end a run instead of restarting it (exit code 2): a restart would fail the same way.

Ray's FailureConfig restarts the worker group after any other failure; these are returned as the
run's result instead (see :mod:`launch.ray_train`). :class:`pretrain.config.ConfigError` (and its
``ResumeMismatch``) belongs to the same family but is a ``ValueError``, so both are listed in
:data:`RUN_ENDING`.
"""

from __future__ import annotations

from pretrain.config import ConfigError


class FatalRunError(RuntimeError):
    """A failure a restart cannot fix: corrupt data past the threshold, a diverged loss, a lost lease..."""


RUN_ENDING: tuple[type[BaseException], ...] = (ConfigError, FatalRunError)
