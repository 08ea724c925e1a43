"""An engine process for tests/test_standalone_leader.py: simulated engine ranks and their leader,
spawned, or found already running for the instance (a standalone one, or one kept by
``DYN_KVBM_LEADER_GRACE_SECS``).

``python tests/standalone_engine.py MODE PROMPTS_JSON [HEAD_DIM]`` (configuration from DYN_KVBM_*;
HEAD_DIM: another layout than the default 32):
prints ``{"ranks": [pid, ...], "spawned": bool}``, waits for a line on stdin, serves the prompts (the engine's own
cache empty, so every hit is kvbm's), then prints its SimStats as JSON. MODE ``hold`` then waits to
be killed; ``exit`` stops the engine cleanly (which leaves a leader it did not spawn running).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict

from kvbm.config import load_config
from kvbm.testing.sim.engine import SimEngine
from kvbm.testing.sim.rank import SimModel

INSTANCE = "standalone-pool"


def main() -> int:
    mode, prompts = sys.argv[1], json.loads(sys.argv[2])
    model = SimModel(num_layers=2, kv_heads=2, head_dim=int(sys.argv[3]) if len(sys.argv) > 3 else 32,
                     num_gpu_blocks=64)
    with SimEngine(load_config(), world_size=2, model=model, instance=INSTANCE) as sim:
        assert sim.leader is not None
        print(json.dumps({"ranks": [sim._rank_pids[r] for r in sorted(sim._rank_pids)],
                          "spawned": sim.leader.spawned}), flush=True)
        sys.stdin.readline()
        sim.run(prompts)
        sim.quiesce()
        print(json.dumps(asdict(sim.stats)), flush=True)
        while mode == "hold":
            time.sleep(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
