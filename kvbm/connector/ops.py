"""The copy ops the scheduler-side planner hands to an engine's workers (plain data).

Every field is an int, a bool, a string or a list of ints, so engines can pickle or msgpack them to
their worker processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

LOAD_WAIT_S = 30.0
"""How long a worker waits for the copies of the loads its step's forward pass reads (loads
that are not waited for report their completion instead); past it they count as failed."""

IDLE_STEP_WAIT_S = 0.005
"""How long an engine step that computes nothing (its requests wait for their KV) may wait for
kvbm: the scheduler side for a load's pin, the workers for a load's copy. Returning at once
would have the engine spin through idle steps, each holding the GIL the copy thread needs and
putting the load off by a step; a new request waits at most this long to be taken in."""


@dataclass
class LoadOp:
    """Host slots -> engine blocks for one request waiting for its external KV.

    ``op_id`` 0 means nothing to copy: the worker only reports the request as received.
    ``failed_blocks`` are engine blocks the planner promised to the engine but kvbm cannot
    fill (fewer slots granted, failed disk staging, leader gone); the engine recomputes them
    (vLLM: ``get_block_ids_with_load_errors``). ``sync``: a firm lookup's load (pinned before
    the engine was told of the hit): the engine computes on these blocks in the step that
    carries it, so the worker copies them before that step's forward pass and reports no
    completion for the request.
    """

    req_id: str
    op_id: int
    slots: list[int]
    blocks: list[int]
    failed_blocks: list[int] = field(default_factory=list)
    sync: bool = False


@dataclass
class StoreOp:
    """Engine blocks -> host slots, copied once the forward pass that computes them is done."""

    req_id: str
    op_id: int
    blocks: list[int]
    slots: list[int]


@dataclass
class StepPlan:
    """One step's work for every worker (all ranks get the same)."""

    loads: list[LoadOp] = field(default_factory=list)
    stores: list[StoreOp] = field(default_factory=list)
    # Requests preempted this step, or whose sliding-window blocks the engine may have freed
    # while scheduling it: their engine blocks may be overwritten by this step's forward pass,
    # so stores still reading them must finish first.
    preempted: list[str] = field(default_factory=list)
    # Finished requests whose engine blocks the engine keeps until the workers report their
    # stores done (the planner's ``finished`` returned True).
    delayed_free: list[str] = field(default_factory=list)

    def extend(self, other: "StepPlan") -> None:
        self.loads += other.loads
        self.stores += other.stores
        self.preempted += other.preempted
        self.delayed_free += other.delayed_free

    def is_empty(self) -> bool:
        return not (self.loads or self.stores or self.preempted or self.delayed_free)
