"""`kvbm bench route`: two simulated engine instances, each with its own leader, sharing one G4
bucket (moto) and publishing KV events to Dynamo's indexer process; the router asks the indexer
where each conversation's prefix lives. A smoke run of the quick trace."""

from __future__ import annotations

import pytest

pytest.importorskip("dynamo.indexer", reason="Dynamo's indexer: pip install ai-dynamo-runtime==1.6.1 (the test extra)")
pytest.importorskip("moto", reason="pip install 'moto[server]' boto3 (the test extra)")

from kvbm.bench import route  # noqa: E402
from kvbm.testing.support import assert_no_segments  # noqa: E402

pytestmark = pytest.mark.slow  # two leaders, two rank processes, an indexer and an S3 server per policy


def test_router_keeps_conversations_on_the_instance_that_holds_them() -> None:
    runs, ideal = route.compare(route.QUICK)
    router, rr = runs["router"], runs["round-robin"]
    for r in (router, rr):
        assert r.prompt_tokens == router.prompt_tokens and sum(r.requests_per_instance) == 24, r
        assert r.mismatches == 0 and r.load_failures == 0 and r.checked_bytes > 0, r  # every loaded byte checked
        assert r.reused <= ideal and r.reused >= 0.85 * ideal, (r, ideal)
    # Round-robin finds most prefixes in the shared store (G4); the router serves them from the
    # instance that holds them (its G1 and G2), which the indexer learned from the events alone.
    assert router.local_reuse > rr.local_reuse + 10, (router, rr)
    assert router.tokens_g4 < rr.tokens_g4, (router, rr)
    assert rr.requests_per_instance == [12, 12] and min(router.requests_per_instance) > 0
    figures = route.results(runs, ideal, route.QUICK)
    assert all(f.ok for f in figures) and len(figures) == 5
    assert_no_segments("route-")
