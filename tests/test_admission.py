"""Tests of the G2 -> G3 admission filter (Dynamo's FrequencyFilter rule)."""

from __future__ import annotations

import pytest

from kvbm.leader.admission import COUNT_MAX, FrequencyFilter


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_first_sighting_rejected_second_admitted() -> None:
    f = FrequencyFilter(clock=FakeClock())
    assert f.should_offload(7) is False
    assert f.count(7) == 1
    assert f.should_offload(7) is True
    assert f.count(7) == 2
    assert f.should_offload(7) is True
    assert f.count(7) == 4
    assert f.count(8) == 0
    assert len(f) == 1


def test_decay_every_interval_drops_zeros() -> None:
    clock = FakeClock()
    f = FrequencyFilter(clock=clock)
    f.should_offload(1)  # 1
    f.should_offload(2)
    f.should_offload(2)  # 2
    clock.t += 599.9
    f.tick()
    assert (f.count(1), f.count(2)) == (1, 2)
    clock.t += 0.1  # 600 s since creation
    f.tick()
    assert (f.count(1), f.count(2)) == (0, 1)
    assert len(f) == 1
    # Once forgotten, a block starts over and is rejected again.
    assert f.should_offload(1) is False


def test_decay_after_a_long_gap_applies_each_missed_interval() -> None:
    clock = FakeClock()
    f = FrequencyFilter(clock=clock)
    for _ in range(4):
        f.should_offload(5)  # 1, 2, 4, 8
    assert f.count(5) == 8
    clock.t += 3 * 600 + 10
    f.tick()
    assert f.count(5) == 5
    clock.t += 590  # the schedule keeps its phase: 4 intervals since creation
    f.tick()
    assert f.count(5) == 4
    clock.t += 600 * 100
    f.tick()
    assert len(f) == 0


def test_repeat_after_decay_doubles_the_decayed_count() -> None:
    clock = FakeClock()
    f = FrequencyFilter(clock=clock)
    f.should_offload(3)
    f.should_offload(3)  # 2
    clock.t += 600
    # The decay is applied before the update: 2 -> 1, then doubled back to 2.
    assert f.should_offload(3) is True
    assert f.count(3) == 2
    clock.t += 1200
    f.tick()
    assert f.count(3) == 0
    assert f.should_offload(3) is False


def test_min_count_threshold() -> None:
    f = FrequencyFilter(min_count=4, clock=FakeClock())
    assert [f.should_offload(9) for _ in range(4)] == [False, False, True, True]


def test_oversize_prunes_repeatedly_and_restarts_interval() -> None:
    clock = FakeClock()
    f = FrequencyFilter(max_entries=3, clock=clock)
    f.should_offload(1)
    for _ in range(3):
        f.should_offload(2)  # 4
    f.should_offload(3)
    clock.t += 300
    assert len(f) == 3
    # A 4th entry overflows: one pass drops every count-1 entry (1, 3, 4) and leaves 2 at 3.
    assert f.should_offload(4) is False
    assert len(f) == 1 and f.count(2) == 3
    # The interval restarted at the prune (t0 + 300): no decay at t0 + 600.
    clock.t += 300
    f.tick()
    assert f.count(2) == 3
    clock.t += 300
    f.tick()
    assert f.count(2) == 2


def test_oversize_needs_several_passes() -> None:
    f = FrequencyFilter(max_entries=2, clock=FakeClock())
    for h in (10, 11):
        for _ in range(3):
            f.should_offload(h)  # 4 each
    f.should_offload(12)  # overflow: passes until <= 2 entries
    assert len(f) == 2
    assert (f.count(10), f.count(11), f.count(12)) == (3, 3, 0)


def test_counts_saturate() -> None:
    f = FrequencyFilter(clock=FakeClock())
    for _ in range(100):
        f.should_offload(1)
    assert f.count(1) == COUNT_MAX


def test_disabled_admits_everything_and_tracks_nothing() -> None:
    f = FrequencyFilter(clock=FakeClock(), enabled=False)
    assert f.should_offload(1) is True
    assert f.should_offload(1) is True
    assert len(f) == 0


@pytest.mark.parametrize(
    "kwargs",
    [{"min_count": 0}, {"decay_interval_s": 0}, {"decay_interval_s": -1.0}, {"max_entries": 0}],
)
def test_bad_parameters(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        FrequencyFilter(**kwargs)  # type: ignore[arg-type]


def test_defaults_are_dynamos() -> None:
    f = FrequencyFilter()
    assert (f.min_count, f.decay_interval_s, f.max_entries, f.enabled) == (2, 600.0, 1_000_000, True)
