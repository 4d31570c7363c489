"""The report's per-stage timings."""

import time

from worker.stopwatch import Stopwatch


def test_laps_add_up_per_stage_and_within_the_total() -> None:
    clock = Stopwatch()
    for stage in ("load", "segment", "load"):
        time.sleep(0.01)
        clock.lap(stage)
    timings = clock.report()
    assert set(timings.model_dump()) >= {"load", "segment", "total"}
    assert timings.load >= 0.02 and timings.segment >= 0.01  # a stage that comes back adds up
    assert timings.load + timings.segment <= timings.total + 1e-3
    assert timings.reference == 0  # no reference: its stage is 0
