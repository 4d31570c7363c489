"""The RQ job class of sitefit: runs one function by name, never imports what a job names.

RQ resolves a job's function and its callbacks by importing the dotted names stored in the
job's Redis hash. Anyone who can write to Redis could thus make a stock worker (or anything
that runs RQ's registry cleanup, which calls failure callbacks) import and call any function.
:class:`SitefitJob` runs only :data:`~sitefit.jobs.QUEUED_FUNCTION` with exactly one job id,
through a runner bound by the worker process (:func:`bound_job_class`), and has no
callbacks at all. The API uses it too for its queue and registry cleanup. No torch here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from rq.job import Job

from sitefit.jobs import QUEUED_FUNCTION, check_job_id

Runner = Callable[[str], object]


class UntrustedJobError(Exception):
    """A job hash in the queue asks for something other than a sitefit job."""


class SitefitJob(Job):
    """An RQ job that can only run the bound sitefit runner on one job id."""

    runner: ClassVar[Runner | None] = None

    @property
    def func(self) -> Callable[..., object]:
        if self.func_name != QUEUED_FUNCTION:
            raise UntrustedJobError("refused: not a sitefit job (unexpected function name)")
        args, kwargs = self.args, self.kwargs
        if kwargs or len(args) != 1 or not isinstance(args[0], str):
            raise UntrustedJobError("refused: a sitefit job takes exactly one job id")
        job_id = check_job_id(args[0])
        runner = type(self).runner
        if runner is None:
            raise UntrustedJobError("refused: this process runs no sitefit jobs")
        return lambda *_args, **_kwargs: runner(job_id)

    # Callbacks are named in the job hash and would be imported by name: never run any.
    @property
    def success_callback(self) -> None:
        return None

    @property
    def failure_callback(self) -> None:
        return None

    @property
    def stopped_callback(self) -> None:
        return None


def bound_job_class(runner: Runner) -> type[SitefitJob]:
    """A :class:`SitefitJob` subclass whose jobs call ``runner(job_id)``."""
    return type("BoundSitefitJob", (SitefitJob,), {"runner": staticmethod(runner)})


__all__ = ["Runner", "SitefitJob", "UntrustedJobError", "bound_job_class"]
