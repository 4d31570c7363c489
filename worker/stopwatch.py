"""Wall time per stage of a job, for the report's ``timings_s``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from sitefit.report import Timings


@dataclass
class Stopwatch:
    """Adds the time since the last lap to a stage (a stage may come back: its laps add up)."""

    timings: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    _last: float = field(default_factory=time.perf_counter)

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings[stage] = self.timings.get(stage, 0.0) + now - self._last
        self._last = now

    def report(self) -> Timings:
        rounded = {k: round(v, 4) for k, v in self.timings.items()}
        return Timings(**rounded, total=round(time.perf_counter() - self.started, 4))
