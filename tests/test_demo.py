"""The demo's ring self-check: both ring formats with every feature set carry checked replies."""

from __future__ import annotations

import pytest

from pyvirtio.demo import exercise_ring


@pytest.mark.parametrize("ring", ["split", "packed"])
@pytest.mark.parametrize("event_idx", [False, True])
@pytest.mark.parametrize("indirect", [False, True])
def test_exercise_ring_checks_every_reply(ring: str, event_idx: bool, indirect: bool) -> None:
    report = exercise_ring(ring, event_idx=event_idx, indirect=indirect, requests=500, size=16)
    assert report.requests == 500
    # Batches of at most 16: at least one kick per batch, never more than one per request.
    assert 500 // 16 <= report.kicks <= 500
    assert 0 < report.interrupts <= 500
