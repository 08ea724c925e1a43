"""Dynamo's KV router index as a process: ``python -m dynamo.indexer`` (ai-dynamo-runtime 1.6.1)
subscribed to the KV-event endpoints of one or more instances, asked over HTTP where a prompt's
prefix lives (``POST /query``)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kvbm.testing.support import free_port


class Indexer:
    """The standalone indexer watching ``workers`` (instance id -> ZMQ event endpoint).

    Start it once the instances' event sockets are bound (Dynamo 1.6.1's indexer started before
    received nothing) and before the traffic to index: the streams have no replay. Its output
    goes to ``log``; :meth:`close` (or leaving a ``with`` block) stops it.
    """

    def __init__(self, workers: Mapping[str, str], block_size: int, log: Path, *, start_timeout_s: float = 60) -> None:
        self.port = free_port()
        self._log_path = log
        self._log = log.open("wb")
        spec = ",".join(f"{wid}={endpoint}" for wid, endpoint in workers.items())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dynamo.indexer", "--block-size", str(block_size), "--port", str(self.port),
             "--threads", "1", "--workers", spec],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError(f"the indexer did not come up; its log: {log.read_text()[-2000:]}") from None
                time.sleep(0.2)

    def query(self, tokens: list[int]) -> dict[str, Any]:
        """The indexer's answer for a prompt: ``{"scores", "frequencies", "instances"}``."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/query",
                                     data=json.dumps({"token_ids": tokens, "model_name": "default"}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as r:
            return dict(json.loads(r.read()))

    def matched(self, tokens: list[int]) -> dict[str, int]:
        """Tokens of ``tokens``' prefix the indexer places on each instance (instances with none left out)."""
        instances = self.query(tokens).get("instances", {})
        return {wid: int(a.get("longest_matched", 0)) for wid, a in instances.items() if a.get("longest_matched")}

    def __enter__(self) -> Indexer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL after 10 s)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait()
        self._log.close()
