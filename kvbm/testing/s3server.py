"""A real S3-compatible server on 127.0.0.1 for tests and benchmarks: moto's server in its own process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from kvbm.testing.support import free_port


class S3Server:
    """``python -m moto.server`` on a free port, with ``bucket`` created when given; :meth:`kill`
    ends it (a server dying mid-run), as leaving a ``with`` block does.

    ``check_credentials``: the server refuses keys other than "test" (moto accepts any by default).
    """

    def __init__(self, bucket: str | None = None, *, check_credentials: bool = False) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test")
        if check_credentials:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"  # moto's switch: authenticate from the first call
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env=env)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.proc.returncode}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError("moto server did not start within 30 s") from None
                time.sleep(0.1)
        if bucket is not None:
            try:
                self.create_bucket(bucket)
            except BaseException:
                self.kill()
                raise

    def create_bucket(self, name: str) -> None:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id="test",
                     aws_secret_access_key="test").create_bucket(Bucket=name)

    def __enter__(self) -> S3Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
