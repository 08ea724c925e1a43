"""G4 object tier, the byte side: one object per host block in an S3-compatible bucket.

No cache policy here (what to write, what is matchable): this is the narrow interface the
leader's object tier is built on, and its two implementations of the transport:

* :class:`S3Backend`, boto3 against any S3-compatible endpoint (``pip install "kvbm[object]"``);
* :class:`NixlObjBackend`, NIXL's OBJ plugin (``nixl-cu12``), which moves a registered DRAM buffer
  straight to/from an object; the descriptor's metadata string is the object key.

Identity and integrity live in :class:`BlockObjects`, whichever transport is used: an object's key
is ``{prefix}{layout:016x}/{seq_hash:016x}`` (the layout fingerprint of
:attr:`kvbm.leader.world.World.layout_fingerprint`, hashed, and the block's sequence hash), and it
holds a 48-byte header (magic, layout, sequence hash, payload length, xxh3-64 of the payload, xxh3
of the header) before the block's bytes. An object that is missing, short, foreign or fails its
checksum is a miss (:class:`GetStatus`), never loaded.
"""

from __future__ import annotations

import enum
import itertools
import os
import struct
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import xxhash

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client  # type: ignore[import-not-found]

OBJECT_MAGIC = b"KVBMOBJ1"
_HEADER = struct.Struct("<8sQQQQ")  # magic, layout, seq_hash, payload bytes, payload checksum
OBJECT_HEADER_BYTES = _HEADER.size + 8  # + xxh3-64 of the fields above


class ObjectError(RuntimeError):
    """The object store cannot be used; one line naming the setting, the value and the cause."""


@dataclass(frozen=True)
class ObjectStoreSettings:
    """Where the objects go (``DYN_KVBM_OBJECT_*``); ``None`` keys: the usual AWS credential chain."""

    bucket: str
    endpoint: str | None = None  # a URL such as http://127.0.0.1:9000; None: AWS
    region: str = "us-east-1"
    access_key: str | None = None
    secret_key: str | None = None
    timeout_s: float = 5.0


class ObjectBackend(Protocol):
    """Whole-object puts and gets; thread-safe. Errors raise :class:`ObjectError`."""

    def put(self, key: str, parts: Sequence[bytes | memoryview]) -> None:
        """Store ``parts`` concatenated as the object ``key`` (replacing any)."""

    def get(self, key: str, size: int) -> bytes | None:
        """The object's bytes (``size`` expected), or None if there is no such object."""

    def exists(self, key: str) -> bool:
        """Whether the object exists (a metadata request, no bytes moved)."""

    def close(self) -> None:
        """Release connections."""


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


class S3Backend:
    """:class:`ObjectBackend` over boto3 (imported here, lazily: an optional extra)."""

    def __init__(self, settings: ObjectStoreSettings) -> None:
        try:
            import boto3
            from botocore.config import Config
        except ImportError as e:
            raise ObjectError(f"the object tier needs boto3: pip install 'kvbm[object]' ({e})") from None
        self.settings = settings
        cfg = Config(connect_timeout=settings.timeout_s, read_timeout=settings.timeout_s,
                     retries={"max_attempts": 1}, max_pool_connections=32,
                     s3={"addressing_style": "path"})
        self._client: S3Client = boto3.client(
            "s3", endpoint_url=settings.endpoint, region_name=settings.region,
            aws_access_key_id=settings.access_key, aws_secret_access_key=settings.secret_key, config=cfg)

    def check(self) -> None:
        """Raise one clear :class:`ObjectError` unless the bucket exists and the credentials work."""
        from botocore.exceptions import BotoCoreError, ClientError

        s = self.settings
        where = f"DYN_KVBM_OBJECT_BUCKET={s.bucket!r} at DYN_KVBM_OBJECT_ENDPOINT={s.endpoint or 'AWS'!r}"
        try:
            self._client.head_bucket(Bucket=s.bucket)
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchBucket"):
                raise ObjectError(f"{where}: no such bucket (create it first)") from None
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise ObjectError(f"{where}: credentials refused ({code}); check DYN_KVBM_OBJECT_ACCESS_KEY / "
                                  "DYN_KVBM_OBJECT_SECRET_KEY or the AWS credential variables") from None
            raise ObjectError(f"{where}: {_one_line(e)}") from None
        except BotoCoreError as e:
            raise ObjectError(f"{where}: unreachable: {_one_line(e)}") from None

    def put(self, key: str, parts: Sequence[bytes | memoryview]) -> None:
        body = b"".join(parts)
        self._call(lambda: self._client.put_object(Bucket=self.settings.bucket, Key=key, Body=body), "put", key)

    def get(self, key: str, size: int) -> bytes | None:
        from botocore.exceptions import ClientError

        try:
            resp = self._client.get_object(Bucket=self.settings.bucket, Key=key)
            data: bytes = resp["Body"].read()
            return data
        except ClientError as e:
            if str(e.response.get("Error", {}).get("Code", "")) in ("404", "NoSuchKey"):
                return None
            raise ObjectError(f"object get of {key} failed: {_one_line(e)}") from None
        except Exception as e:  # connection errors, timeouts
            raise ObjectError(f"object get of {key} failed: {_one_line(e)}") from None

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._client.head_object(Bucket=self.settings.bucket, Key=key)
            return True
        except ClientError as e:
            if str(e.response.get("Error", {}).get("Code", "")) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise ObjectError(f"object lookup of {key} failed: {_one_line(e)}") from None
        except Exception as e:
            raise ObjectError(f"object lookup of {key} failed: {_one_line(e)}") from None

    def _call(self, fn: object, op: str, key: str) -> None:
        assert callable(fn)
        try:
            fn()
        except Exception as e:
            raise ObjectError(f"object {op} of {key} failed: {_one_line(e)}") from None

    def close(self) -> None:
        self._client.close()


_NIXL_MODULES = ("nixl", "nixl_cu12", "nixl_cu13")


def nixl_installed() -> bool:
    """Whether a NIXL wheel (``nixl``, ``nixl-cu12`` or ``nixl-cu13``) can be imported."""
    import importlib.util

    return any(importlib.util.find_spec(name) is not None for name in _NIXL_MODULES)


def _import_nixl():  # type: ignore[no-untyped-def]
    """NIXL's Python API from the ``nixl`` meta package or the ``nixl-cu12`` / ``nixl-cu13`` wheel."""
    for name in (f"{m}._api" for m in _NIXL_MODULES):
        try:
            return __import__(name, fromlist=["nixl_agent"])
        except ImportError:
            continue
    raise ObjectError("the NIXL object backend needs NIXL: pip install 'kvbm[cuda12]' (nixl-cu12)")


class NixlObjBackend:
    """:class:`ObjectBackend` over NIXL's OBJ plugin: each transfer moves a registered DRAM buffer
    to or from one object (the OBJ descriptor's metadata string is the key).

    NIXL's agent is used from one thread at a time here (its non-thread-safe sync mode), so the
    transfers of one backend are serialized.
    """

    def __init__(self, settings: ObjectStoreSettings) -> None:
        from urllib.parse import urlsplit

        api = _import_nixl()
        self.settings = settings
        params = {"bucket": settings.bucket, "region": settings.region, "use_virtual_addressing": "false"}
        if settings.endpoint:
            url = urlsplit(settings.endpoint)
            params["endpoint_override"] = url.netloc
            params["scheme"] = url.scheme or "http"
        if settings.access_key:
            params["access_key"] = settings.access_key
        if settings.secret_key:
            params["secret_key"] = settings.secret_key
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._name = f"kvbm-obj-{os.getpid()}-{id(self):x}"
        try:
            self._agent = api.nixl_agent(self._name, api.nixl_agent_config(backends=[]))
            self._agent.create_backend("OBJ", params)
        except Exception as e:
            raise ObjectError(f"NIXL OBJ backend for DYN_KVBM_OBJECT_BUCKET={settings.bucket!r}: {_one_line(e)}") from None

    def _transfer(self, op: str, buf: np.ndarray, key: str) -> None:
        """One WRITE (buffer -> object) or READ (object -> buffer); raises on failure or timeout."""
        agent, n = self._agent, buf.nbytes
        with self._lock:
            dev = next(self._ids)
            dram = agent.register_memory(agent.get_reg_descs([(buf.ctypes.data, n, 0, "")], "DRAM"))
            obj = agent.register_memory(agent.get_reg_descs([(0, n, dev, key)], "OBJ"))
            handle = None
            try:
                handle = agent.initialize_xfer(op, agent.get_xfer_descs([(buf.ctypes.data, n, 0)], "DRAM"),
                                               agent.get_xfer_descs([(0, n, dev)], "OBJ"), self._name)
                state = agent.transfer(handle)
                deadline = time.monotonic() + self.settings.timeout_s
                while state == "PROC":
                    if time.monotonic() > deadline:
                        raise ObjectError(f"NIXL OBJ {op} of {key} timed out after {self.settings.timeout_s:g} s")
                    time.sleep(0.0002)
                    state = agent.check_xfer_state(handle)
                if state != "DONE":
                    raise ObjectError(f"NIXL OBJ {op} of {key} failed: {state}")
            finally:
                if handle is not None:
                    agent.release_xfer_handle(handle)
                agent.deregister_memory(obj)
                agent.deregister_memory(dram)

    def put(self, key: str, parts: Sequence[bytes | memoryview]) -> None:
        buf = np.frombuffer(b"".join(parts), dtype=np.uint8)
        try:
            self._transfer("WRITE", buf, key)
        except ObjectError:
            raise
        except Exception as e:
            raise ObjectError(f"NIXL OBJ put of {key} failed: {_one_line(e)}") from None

    def get(self, key: str, size: int) -> bytes | None:
        buf = np.empty(size, dtype=np.uint8)
        try:
            self._transfer("READ", buf, key)
        except Exception as e:
            if not self.exists(key):
                return None
            raise ObjectError(f"NIXL OBJ get of {key} failed: {_one_line(e)}") from None
        return buf.tobytes()

    def exists(self, key: str) -> bool:
        try:
            with self._lock:
                found = self._agent.query_memory([(0, 1, 0, key)], "OBJ", "OBJ")
        except Exception as e:
            raise ObjectError(f"NIXL OBJ lookup of {key} failed: {_one_line(e)}") from None
        return found[0] is not None

    def close(self) -> None:
        # A transfer stuck in the plugin (a dead store) holds the lock: do not wait for it forever.
        if self._lock.acquire(timeout=1.0):
            try:
                self._agent = None
            finally:
                self._lock.release()


class SplitBackend:
    """:class:`ObjectBackend` moving bytes through one transport (NIXL OBJ) and answering existence
    queries through another (boto3 HEAD requests, which run in parallel where NIXL's agent is
    used by one thread at a time)."""

    def __init__(self, data: ObjectBackend, lookups: ObjectBackend) -> None:
        self.data = data
        self.lookups = lookups

    def put(self, key: str, parts: Sequence[bytes | memoryview]) -> None:
        self.data.put(key, parts)

    def get(self, key: str, size: int) -> bytes | None:
        return self.data.get(key, size)

    def exists(self, key: str) -> bool:
        return self.lookups.exists(key)

    def close(self) -> None:
        self.data.close()
        self.lookups.close()


class GetStatus(enum.Enum):
    """How a block read from the store ended; only ``OK`` means the bytes may be used."""

    OK = "ok"
    MISSING = "missing"
    CORRUPT = "corrupt"  # short, foreign, or the checksum failed
    FAILED = "failed"  # the store could not be asked (the error says why)


@dataclass(frozen=True)
class GetResult:
    status: GetStatus
    error: str = ""


class BlockObjects:
    """Blocks of one layout as checksummed objects, over any :class:`ObjectBackend`."""

    def __init__(self, backend: ObjectBackend, layout: int, block_bytes: int, *, prefix: str = "kvbm/",
                 lookup_threads: int = 8) -> None:
        self.backend = backend
        self.layout = layout
        self.block_bytes = block_bytes
        self.prefix = prefix
        self._lookups = ThreadPoolExecutor(max_workers=lookup_threads, thread_name_prefix="kvbm-obj-lookup")

    def key(self, seq_hash: int) -> str:
        """The object key of a block: namespaced by the layout fingerprint."""
        return f"{self.prefix}{self.layout:016x}/{seq_hash:016x}"

    def header(self, seq_hash: int, payload: memoryview) -> bytes:
        fields = _HEADER.pack(OBJECT_MAGIC, self.layout, seq_hash, len(payload), xxhash.xxh3_64_intdigest(payload))
        return fields + struct.pack("<Q", xxhash.xxh3_64_intdigest(fields))

    def put(self, seq_hash: int, block: memoryview) -> None:
        """Store one block (exactly ``block_bytes``); raises :class:`ObjectError`."""
        if block.nbytes != self.block_bytes:
            raise ValueError(f"object block has {block.nbytes} bytes, expected {self.block_bytes}")
        self.backend.put(self.key(seq_hash), [self.header(seq_hash, block), block])

    def get(self, seq_hash: int, dst: memoryview) -> GetResult:
        """Read one block into ``dst`` if its object is whole and ours; ``dst`` is untouched otherwise."""
        res, payload = self.fetch(seq_hash)
        if payload is not None:
            dst[:] = payload
        return res

    def fetch(self, seq_hash: int) -> tuple[GetResult, memoryview | None]:
        """One block's checked payload (a view of the object's bytes; None unless the status is OK)."""
        try:
            data = self.backend.get(self.key(seq_hash), OBJECT_HEADER_BYTES + self.block_bytes)
        except ObjectError as e:
            return GetResult(GetStatus.FAILED, str(e)), None
        if data is None:
            return GetResult(GetStatus.MISSING), None
        problem = self.check(seq_hash, data)
        if problem:
            return GetResult(GetStatus.CORRUPT, problem), None
        return GetResult(GetStatus.OK), memoryview(data)[OBJECT_HEADER_BYTES:]

    def check(self, seq_hash: int, data: bytes) -> str:
        """Why ``data`` is not the object of ``seq_hash`` in this layout ('' if it is)."""
        if len(data) != OBJECT_HEADER_BYTES + self.block_bytes:
            return f"object of {seq_hash:016x} has {len(data)} bytes, expected {OBJECT_HEADER_BYTES + self.block_bytes}"
        magic, layout, h, n, checksum = _HEADER.unpack_from(data)
        (hcheck,) = struct.unpack_from("<Q", data, _HEADER.size)
        if magic != OBJECT_MAGIC or hcheck != xxhash.xxh3_64_intdigest(data[:_HEADER.size]):
            return f"object of {seq_hash:016x} has no valid kvbm header"
        if (layout, h, n) != (self.layout, seq_hash, self.block_bytes):
            return f"object of {seq_hash:016x} holds another block or layout"
        if xxhash.xxh3_64_intdigest(memoryview(data)[OBJECT_HEADER_BYTES:]) != checksum:
            return f"object of {seq_hash:016x} failed its checksum"
        return ""

    def contains(self, hashes: Sequence[int]) -> list[bool]:
        """Which blocks have an object, asked concurrently (a batch lookup; errors count as absent)."""

        def one(h: int) -> bool:
            try:
                return self.backend.exists(self.key(h))
            except ObjectError:
                return False

        return list(self._lookups.map(one, hashes))

    def close(self, wait: bool = True) -> None:
        """Stop the lookup threads (``wait``: let running lookups finish) and release the transport."""
        self._lookups.shutdown(wait=wait, cancel_futures=not wait)
        self.backend.close()
