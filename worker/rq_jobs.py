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
from dataclasses import dataclass
from typing import ClassVar

from rq import Queue
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


BUSY_FIELD = "@busy"  # in a warm record: the job the worker runs now, "" when idle


@dataclass(frozen=True)
class WarmKeys:
    """The Redis names of warm routing on the RQ queue ``queue``.

    - :meth:`own_queue` ``<queue>:w:<worker>``: an RQ queue name; the worker's own list of job
      ids, which it takes from before the shared queue. The jobs in it belong to the shared
      queue (their RQ origin, registries and retries are the shared queue's).
    - :meth:`record` (hash): what the worker says about itself: :data:`BUSY_FIELD`, and
      ``MODEL/SITE`` -> the newest version of that site's weights it holds warm. It expires
      three heartbeats after the worker last renewed it: a record that exists is a live
      worker's.
    - :attr:`workers` (set): the ids of workers that published a record (pruned by the API).
    - :attr:`routed` (sorted set): ``"<worker> <job id>"`` -> the Unix time at which the job
      moves to the shared queue unless the worker has taken it by then.
    """

    queue: str

    def own_queue(self, worker: str) -> str:
        return f"{self.queue}:w:{worker}"

    def own_list(self, worker: str) -> str:
        """The Redis list of :meth:`own_queue` (RQ's key of that queue)."""
        return Queue.redis_queue_namespace_prefix + self.own_queue(worker)

    def record(self, worker: str) -> str:
        return f"sitefit:{self.queue}:warm:{worker}"

    @property
    def workers(self) -> str:
        return f"sitefit:{self.queue}:warm-workers"

    @property
    def routed(self) -> str:
        return f"sitefit:{self.queue}:routed"


def warm_field(model: str, site: str) -> str:
    """A warm record's field for a site's weights on a base model (``NAME`` or ``NAME@V``)."""
    return f"{model.split('@', 1)[0]}/{site}"


__all__ = [
    "BUSY_FIELD",
    "Runner",
    "SitefitJob",
    "UntrustedJobError",
    "WarmKeys",
    "bound_job_class",
    "warm_field",
]
