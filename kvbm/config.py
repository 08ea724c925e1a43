"""Every ``DYN_KVBM_*`` environment variable, parsed and validated once.

This is the only module that reads ``DYN_KVBM_*`` variables from the process
environment (in :func:`load_config`). Everything else receives a frozen
:class:`KvbmConfig`. A spawned process gets its configuration back through
:meth:`KvbmConfig.to_env`.

All variables are described by one table, :data:`VARIABLES`. Parsing,
validation, :meth:`KvbmConfig.describe` (``kvbm config``) and the README table
(:func:`markdown_table`) all read that table. Dynamo variables kvbm accepts
without effect are the second table, :data:`NO_EFFECT`: their values are
checked, then ignored with one warning; they set no field.

Bad input raises :class:`ConfigError` with one line that names the variable,
the value given and what is accepted, e.g.::

    DYN_KVBM_CPU_CACHE_GB='ten': expected a number of gigabytes >= 0 (e.g. 4 or 0.5)

Stdlib only: importing this module must stay cheap (no numpy, no zmq).
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "NO_EFFECT",
    "VARIABLES",
    "ConfigError",
    "Endpoint",
    "KvbmConfig",
    "NoEffect",
    "TierSize",
    "Variable",
    "is_loopback_endpoint",
    "is_loopback_host",
    "format_bytes",
    "load_config",
    "markdown_table",
    "parse_bool",
    "parse_endpoint",
    "parse_int",
    "parse_number",
]

log = logging.getLogger(__name__)

PREFIX = "DYN_KVBM_"
DEFAULT_PUB_PORT = 56001
# Unix socket paths (sun_path) hold at most 107 bytes plus the NUL.
MAX_IPC_PATH_BYTES = 107
# The run dir holds ipc sockets named by other modules; leave them room.
MAX_RUN_DIR_BYTES = 80
_MAX_INT = 2**63 - 1
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# One day: longer waits are a typo, and every poll and deadline computed from this value
# stays far inside the ranges of zmq's int milliseconds and of time stamps.
MAX_INIT_TIMEOUT_S = 86400
MAX_LEADER_GRACE_S = 86400
DISK_ALLOCATORS = ("default", "open-direct")  # Dynamo 1.6.1's DYN_KVBM_DISK_ALLOCATOR_TYPE
CONSOLIDATOR_MODES = ("dedup", "passthrough", "baseten_dedup")
WORKER_ID = "{worker_id}"  # in DYN_KVBM_OBJECT_BUCKET: replaced by the instance name
DEFAULT_OBJECT_BUCKET = "dynamo-kv-cache"  # Dynamo's fallback bucket
OBJECT_TRANSPORTS = ("s3", "nixl")
BLOCK_FORMATS = ("auto", "heads", "slices")  # kvbm.ipc.block_format.choose_heads
LOAD_MODES = ("auto", "sync", "async")  # G2 hits under vLLM: kvbm.vllm_integration.connector.scheduler_side


class ConfigError(ValueError):
    """Invalid configuration. ``str(err)`` is the one line to show the user."""


# --------------------------------------------------------------------------
# Value parsers. Each takes the raw string and returns the typed value or
# raises ValueError; the caller turns that into a ConfigError naming the
# variable, so the parsers stay tiny and reusable.

_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
_NUMBER_RE = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_INT_RE = re.compile(r"[+-]?\d+")
_HOSTNAME_RE = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)


def parse_bool(raw: str) -> bool:
    """true/false/1/0/yes/no, any case, surrounding blanks ignored."""
    try:
        return _BOOLS[raw.strip().lower()]
    except KeyError:
        raise ValueError(raw) from None


def parse_number(raw: str) -> float:
    """A finite decimal number (``4``, ``0.5``, ``1e3``); no nan/inf, no ``_``."""
    text = raw.strip()
    if not _NUMBER_RE.fullmatch(text):
        raise ValueError(raw)
    value = float(text)
    if not math.isfinite(value):  # e.g. 1e999
        raise ValueError(raw)
    return value


def parse_int(raw: str) -> int:
    """A whole decimal number (``1024``); ``4.0`` and ``1e3`` are rejected."""
    text = raw.strip()
    if not _INT_RE.fullmatch(text):
        raise ValueError(raw)
    return int(text)


def _parse_level(raw: str) -> str:
    level = raw.strip().upper()
    if level not in LOG_LEVELS:
        raise ValueError(raw)
    return level


def _parse_dir(raw: str) -> str:
    # Relative paths are resolved now: a spawned leader may run elsewhere.
    if "\0" in raw or not raw.strip():
        raise ValueError(raw)
    return raw if os.path.isabs(raw) else os.path.abspath(raw)


def _parse_abs_dir(raw: str) -> str:
    if "\0" in raw or not os.path.isabs(raw):
        raise ValueError(raw)
    return raw


def _parse_host(raw: str) -> str:
    host = raw.strip()
    if not _valid_host(host):
        raise ValueError(raw)
    return host


_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_REGION_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


def _bucket_ok(name: str) -> bool:
    """An S3 bucket name (3-63 of a-z 0-9 . -), ``{worker_id}`` standing for the instance name."""
    return bool(_BUCKET_RE.fullmatch(name.replace(WORKER_ID, "w0")))


def _parse_bucket(raw: str) -> str:
    name = raw.strip()
    if not _bucket_ok(name):
        raise ValueError(raw)
    return name


def _url_ok(url: str) -> bool:
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError for a bad port
    except ValueError:
        return False
    host = parts.hostname or ""
    return (parts.scheme in ("http", "https") and _valid_host(host)
            and port != 0 and parts.path in ("", "/") and not parts.query and not parts.fragment)


def _parse_url(raw: str) -> str:
    url = raw.strip()
    if not _url_ok(url):
        raise ValueError(raw)
    return url.rstrip("/")


def _parse_region(raw: str) -> str:
    region = raw.strip().lower()
    if not _REGION_RE.fullmatch(region):
        raise ValueError(raw)
    return region


def _parse_secret(raw: str) -> str:
    if any(c.isspace() for c in raw.strip()) or "\0" in raw:
        raise ValueError(raw)
    return raw.strip()


def _parse_endpoint_str(raw: str) -> str:
    text = raw.strip()
    parse_endpoint(text)
    return text


@dataclass(frozen=True)
class Endpoint:
    """A parsed ZMQ address: ``tcp://host:port`` or ``ipc://path``."""

    scheme: str  # "tcp" or "ipc"
    host: str = ""  # tcp only; IPv6 without brackets
    port: int = 0  # tcp only
    path: str = ""  # ipc only

    @property
    def is_loopback(self) -> bool:
        """ipc is always local; tcp only for 127.0.0.0/8, ::1 and localhost."""
        return self.scheme == "ipc" or is_loopback_host(self.host)


def _valid_host(host: str) -> bool:
    if host == "*":  # ZMQ: bind on every interface
        return True
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return bool(_HOSTNAME_RE.fullmatch(host))


def is_loopback_host(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost`` (no DNS lookup)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_loopback_endpoint(endpoint: str) -> bool:
    """True for ipc:// and inproc:// (always local) and tcp:// on a loopback host.

    Anything else, including ``tcp://*:PORT`` (every interface) and text that is not an
    endpoint, is not loopback.
    """
    if endpoint.startswith("inproc://"):
        return True
    try:
        return parse_endpoint(endpoint).is_loopback
    except ValueError:
        return False


def parse_endpoint(text: str) -> Endpoint:
    """Parse ``tcp://HOST:PORT`` (IPv6 as ``[::1]``) or ``ipc://PATH``.

    ``PATH`` is absolute (or ``@name``, Linux abstract namespace) and fits a
    Unix socket address. Raises ValueError otherwise.
    """
    if text.startswith("ipc://"):
        path = text[len("ipc://"):]
        if not (path.startswith("/") or (path.startswith("@") and len(path) > 1)):
            raise ValueError(text)
        if "\0" in path or len(path.encode()) > MAX_IPC_PATH_BYTES:
            raise ValueError(text)
        return Endpoint("ipc", path=path)
    if text.startswith("tcp://"):
        hostport = text[len("tcp://"):]
        m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]/]+):(\d+)", hostport)
        if not m:
            raise ValueError(text)
        host = m.group(1) or m.group(3)
        port = int(m.group(2) or m.group(4))
        if m.group(1):  # bracketed: must be IPv6
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ValueError(text) from None
        elif not _valid_host(host):
            raise ValueError(text)
        if not 1 <= port <= 65535:
            raise ValueError(text)
        return Endpoint("tcp", host=host, port=port)
    raise ValueError(text)


def _tcp_address(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


# --------------------------------------------------------------------------
# Value kinds: how a field's value is parsed, type-checked and written back.


@dataclass(frozen=True)
class _Kind:
    parse: Callable[[str], Any]
    typed: Callable[[Any], bool]  # right Python type (direct construction)
    fmt: Callable[[Any], str]


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _fmt_bool(v: Any) -> str:
    return "true" if v else "false"


_NUM = _Kind(parse_number, _is_num, repr)
_INT = _Kind(parse_int, _is_int, str)
_BOOL = _Kind(parse_bool, lambda v: isinstance(v, bool), _fmt_bool)
_DIR = _Kind(_parse_dir, lambda v: isinstance(v, str) and v != "" and "\0" not in v, str)
_ABS_DIR = _Kind(_parse_abs_dir, lambda v: isinstance(v, str) and os.path.isabs(v), str)
_HOST = _Kind(_parse_host, lambda v: isinstance(v, str) and _valid_host(v), str)
_LEVEL = _Kind(_parse_level, lambda v: v in LOG_LEVELS, str)
_BUCKET = _Kind(_parse_bucket, lambda v: isinstance(v, str) and _bucket_ok(v), str)
_URL = _Kind(_parse_url, lambda v: isinstance(v, str) and _url_ok(v), str)
_REGION = _Kind(_parse_region, lambda v: isinstance(v, str) and bool(_REGION_RE.fullmatch(v)), str)
_SECRET = _Kind(_parse_secret, lambda v: isinstance(v, str) and v != "" and not any(c.isspace() for c in v), str)


def _endpoint_ok(v: Any) -> bool:
    try:
        parse_endpoint(v)
        return True
    except (ValueError, TypeError, AttributeError):
        return False


_ENDPOINT = _Kind(_parse_endpoint_str, _endpoint_ok, str)


def _nonneg(v: Any) -> bool:
    return bool(v >= 0)


def _positive(v: Any) -> bool:
    return bool(v > 0)


def _port(v: Any) -> bool:
    return bool(1 <= v <= 65535)


def _count(v: Any) -> bool:
    return bool(1 <= v <= _MAX_INT)


def _blocks(v: Any) -> bool:
    return bool(0 <= v <= _MAX_INT)


def _run_dir_len(v: Any) -> bool:
    return len(str(v).encode()) <= MAX_RUN_DIR_BYTES


def _init_timeout(v: Any) -> bool:
    return bool(0 < v <= MAX_INIT_TIMEOUT_S)


def _leader_grace(v: Any) -> bool:
    return bool(0 <= v <= MAX_LEADER_GRACE_S)


def _always(v: Any) -> bool:
    return True


def _word(choices: tuple[str, ...]) -> _Kind:
    """A kind for one word out of ``choices`` (any case, stored lower case)."""

    def parse(raw: str) -> str:
        word = raw.strip().lower()
        if word not in choices:
            raise ValueError(raw)
        return word

    return _Kind(parse, lambda v: v in choices, str)


def _one_of(choices: tuple[str, ...]) -> str:
    return f"one of {', '.join(choices)} (any case)"


class _Checked:
    """Parsing and range-checking of a raw value, shared by :class:`Variable` and :class:`NoEffect`."""

    name: str
    kind: _Kind
    accepts: str  # completes "expected ..." in error messages
    check: Callable[[Any], bool]
    empty_hint: str
    secret: bool
    aliases: tuple[str, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    def error(self, value: str, name: str | None = None) -> ConfigError:
        shown = "<hidden>" if self.secret else repr(value)
        return ConfigError(f"{name or self.name}={shown}: expected {self.accepts}")

    def parse(self, raw: str, name: str | None = None) -> Any:
        """Parse and range-check ``raw`` as given under ``name`` (or an alias)."""
        if not raw.strip():
            raise self._empty(raw, name)
        try:
            value = self.kind.parse(raw)
        except ValueError:
            raise self.error(raw, name) from None
        if not self.check(value):
            raise self.error(raw, name)
        return value

    def _empty(self, raw: str, name: str | None) -> ConfigError:
        msg = str(self.error(raw, name))
        return ConfigError(f"{msg}; an empty value is not accepted ({self.empty_hint})")


@dataclass(frozen=True)
class Variable(_Checked):
    """One row of the configuration table: a variable that sets a :class:`KvbmConfig` field."""

    name: str  # the environment variable
    field: str  # the KvbmConfig field it sets
    kind: _Kind
    accepts: str
    meaning: str  # one line for `kvbm config --markdown` / the README
    check: Callable[[Any], bool] = _always  # range check on the typed value
    aliases: tuple[str, ...] = ()
    default_text: str | None = None  # README default when not the field default
    empty_hint: str = "unset the variable to use the default"
    secret: bool = False  # never shown (kvbm config, error messages)

    def validate(self, value: Any) -> None:
        """Check a typed value (direct construction / replace)."""
        if not self.kind.typed(value) or not self.check(value):
            raise self.error(value if isinstance(value, str) else repr(value))


# Dynamo free text (a module path, a namespace, a backend parameter): any value, even empty.
_TEXT = _Kind(str, lambda v: isinstance(v, str), str)


@dataclass(frozen=True)
class NoEffect(_Checked):
    """A Dynamo variable kvbm accepts without effect: a Dynamo deployment's environment works
    unchanged, a set value is checked as Dynamo would read it (a typo still fails at start-up),
    then ignored; ``why`` says why kvbm has no use for it. Nothing in :class:`KvbmConfig` holds it.
    """

    name: str  # the variable, or with ``prefix`` the start of a family (DYN_KVBM_NIXL_BACKEND_*)
    why: str  # why it has no effect in kvbm, one line for the docs and `kvbm config`
    kind: _Kind = _TEXT
    accepts: str = "any value"
    check: Callable[[Any], bool] = _always
    aliases: tuple[str, ...] = ()
    prefix: bool = False
    empty_hint: str = "unset the variable: it has no effect in kvbm"
    secret: bool = False

    def matches(self, name: str) -> bool:
        """True for this variable, its aliases and, with ``prefix``, every name it starts."""
        return name == self.name or name in self.aliases or (self.prefix and name.startswith(self.name))

    def parse(self, raw: str, name: str | None = None) -> Any:
        """Free text as given (even empty); otherwise parsed and range-checked as a Variable."""
        return raw if self.kind is _TEXT else super().parse(raw, name)


_BOOL_ACCEPTS = "a boolean (true/false, 1/0, yes/no; any case)"
_PRESENCE_HINT = "Dynamo treats a set-but-empty variable as on; write 1 or true, or unset it"
_ENDPOINT_ACCEPTS = (
    "a ZMQ address tcp://HOST:PORT (IPv6 as tcp://[::1]:PORT) or ipc:///absolute/path "
    f"(at most {MAX_IPC_PATH_BYTES} bytes)"
)

VARIABLES: tuple[Variable, ...] = (
    Variable("DYN_KVBM_CPU_CACHE_GB", "cpu_cache_gb", _NUM,
             "a number of gigabytes >= 0 (e.g. 4 or 0.5)",
             "Host (G2) pool size in decimal GB (x1e9 bytes); 0 or unset: no host tier",
             _nonneg),
    Variable("DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS", "cpu_cache_num_blocks", _INT,
             "a whole number of blocks >= 0 (e.g. 1024)",
             "Exact host (G2) block count; wins over DYN_KVBM_CPU_CACHE_GB; 0 = not set",
             _blocks),
    Variable("DYN_KVBM_DISK_CACHE_GB", "disk_cache_gb", _NUM,
             "a number of gigabytes >= 0 (e.g. 100 or 0.5)",
             "Disk (G3) cache size in decimal GB; 0 or unset: no disk tier",
             _nonneg),
    Variable("DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS", "disk_cache_num_blocks", _INT,
             "a whole number of blocks >= 0 (e.g. 8192)",
             "Exact disk (G3) block count; wins over DYN_KVBM_DISK_CACHE_GB; 0 = not set",
             _blocks),
    Variable("DYN_KVBM_DISK_CACHE_DIR", "disk_cache_dir", _DIR,
             "a directory path (e.g. /tmp/ or /mnt/nvme/kvbm)",
             "Directory for the disk cache files (an existing, writable directory)"),
    Variable("DYN_KVBM_DISK_CACHE_PERSIST", "disk_cache_persist", _BOOL,
             _BOOL_ACCEPTS,
             "Keep the disk cache across restarts: one file per layout fingerprint in DYN_KVBM_DISK_CACHE_DIR, "
             "re-indexed by the next leader of the same layout (off: a private file per instance)"),
    Variable("DYN_KVBM_DISK_ZEROFILL_FALLBACK", "disk_zerofill_fallback", _BOOL,
             _BOOL_ACCEPTS,
             "Zero-fill the disk file when fallocate is unsupported (else sparse file)",
             empty_hint=_PRESENCE_HINT),
    Variable("DYN_KVBM_DISK_DISABLE_O_DIRECT", "disk_disable_o_direct", _BOOL,
             _BOOL_ACCEPTS, "Use buffered instead of O_DIRECT disk I/O",
             empty_hint=_PRESENCE_HINT),
    Variable("DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER", "disable_disk_offload_filter", _BOOL,
             _BOOL_ACCEPTS,
             "Offload every host block to disk, not only blocks seen twice"),
    Variable("DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS", "init_timeout_s", _NUM,
             f"a number of seconds in (0, {MAX_INIT_TIMEOUT_S}] (e.g. 120 or 1800)",
             "Deadline for all ranks to sync with the leader at start-up (Dynamo's bindings: "
             "1800; kvbm waits only for rank skew, see below)", _init_timeout),
    Variable("DYN_KVBM_METRICS", "metrics_enabled", _BOOL, _BOOL_ACCEPTS,
             "Serve Prometheus metrics on /metrics"),
    Variable("DYN_KVBM_METRICS_PORT", "metrics_port", _INT, "a port number 1-65535",
             "Port of the /metrics server", _port),
    Variable("DYN_KVBM_LEADER_GRACE_SECS", "leader_grace_s", _NUM,
             f"a number of seconds in [0, {MAX_LEADER_GRACE_S}] (e.g. 60)",
             "How long an engine-spawned leader keeps the pool after its engine is gone, for an "
             "engine restarted with the same instance name to find G2 warm (0: it exits with the engine)",
             _leader_grace),
    Variable("DYN_KVBM_LEADER_ENDPOINT", "leader_endpoint", _ENDPOINT, _ENDPOINT_ACCEPTS,
             "ZMQ address of a running leader, or the one to bind; unset: a private "
             "ipc socket under DYN_KVBM_RUN_DIR"),
    Variable("DYN_KVBM_LEADER_ZMQ_HOST", "leader_zmq_host", _HOST,
             "a host name or IP address (e.g. 127.0.0.1)",
             "Dynamo compat: if this or DYN_KVBM_LEADER_ZMQ_PUB_PORT is set, the leader "
             "endpoint is tcp://HOST:PUB_PORT (HOST defaults to 127.0.0.1)"),
    Variable("DYN_KVBM_LEADER_ZMQ_PUB_PORT", "leader_zmq_pub_port", _INT,
             "a port number 1-65535", "Dynamo compat: leader port, see DYN_KVBM_LEADER_ZMQ_HOST",
             _port),
    Variable("DYN_KVBM_ALLOW_NON_LOOPBACK", "allow_non_loopback", _BOOL, _BOOL_ACCEPTS,
             "Allow a leader tcp address other than 127.0.0.0/8, ::1 or localhost "
             "(the leader socket is unauthenticated)"),
    Variable("DYN_KVBM_RUN_DIR", "run_dir", _ABS_DIR,
             f"an absolute directory path of at most {MAX_RUN_DIR_BYTES} bytes",
             "Private directory for kvbm's ipc sockets", _run_dir_len,
             default_text="/tmp/kvbm-<uid>"),
    Variable("DYN_KVBM_MAX_CONCURRENT_TRANSFERS", "max_concurrent_transfers", _INT,
             "a whole number >= 1 (e.g. 4)",
             "G2<->G3 disk transfers in flight: the leader's disk I/O threads, reads and writes together",
             _count),
    Variable("DYN_KVBM_KV_EVENTS_ENDPOINT", "kv_events_endpoint", _ENDPOINT,
             _ENDPOINT_ACCEPTS,
             "ZMQ PUB address for KV cache events (e.g. tcp://127.0.0.1:5557); unset: off. "
             "Loopback only unless DYN_KVBM_ALLOW_NON_LOOPBACK=1"),
    Variable("DYN_KVBM_DISK_BOUNCE_BLOCKS", "disk_bounce_blocks", _INT,
             "a whole number of blocks >= 1 (e.g. 32)",
             "Host staging slots when only the disk tier is configured", _count),
    Variable("DYN_KVBM_CACHE_STATS_MAX_REQUESTS", "cache_stats_max_requests", _INT,
             "a whole number of requests >= 1 (e.g. 1000)",
             "Sliding window of the hit-rate gauges, in requests", _count),
    Variable("DYN_KVBM_HEARTBEAT_INTERVAL_SECS", "heartbeat_interval_s", _NUM,
             "a number of seconds > 0 (e.g. 0.25)", "Leader/worker heartbeat period",
             _positive),
    Variable("DYN_KVBM_LIVENESS_TIMEOUT_SECS", "liveness_timeout_s", _NUM,
             "a number of seconds > 0, above DYN_KVBM_HEARTBEAT_INTERVAL_SECS (e.g. 1.5)",
             "A peer silent this long is considered dead", _positive),
    Variable("DYN_KVBM_LOG_LEVEL", "log_level", _LEVEL,
             "one of DEBUG, INFO, WARNING, ERROR (any case)", "kvbm log level"),
    Variable("DYN_KVBM_INDEX_REPLICA", "index_replica", _BOOL, _BOOL_ACCEPTS,
             "Answer the engine scheduler's lookups from a local replica of the leader's index, kept "
             "current from the leader's index stream (false, or with the object tier on: every lookup is a "
             "leader round trip; "
             "see docs/architecture.md, scheduler hot path)"),
    Variable("DYN_KVBM_BLOCK_FORMAT", "block_format", _word(BLOCK_FORMATS), _one_of(BLOCK_FORMATS),
             "kvbm's: the bytes of a G2/G3/G4 block of a model whose KV heads are split over TP ranks: heads "
             "(every head in the model's order: the same block at every TP size, so a disk or object cache "
             "written at one TP size serves another; CPU copies at TP > 1 of token-major engines move one row "
             "per token), slices (one slice per rank: fastest copies, tied to the TP size) or auto (heads "
             "where a rank's heads are one piece of each region: TP=1, head-major engines; else slices); "
             "see docs/architecture.md"),
    Variable("DYN_KVBM_HOST_LOADS", "host_loads", _word(LOAD_MODES), _one_of(LOAD_MODES),
             "kvbm's: how vLLM loads a hit wholly in G2: sync (pinned at lookup, copied right before the "
             "forward pass that computes the request: its first token a step earlier), async (the request "
             "waits a step for its copy; the GPU default, where the copy overlaps other requests' compute) "
             "or auto (sync where the engine's KV is in host memory, vLLM's CPU backend); G3/G4 hits are "
             "always asynchronous; see docs/vllm.md"),
    Variable("DYN_KVBM_OBJECT_ENABLED", "object_enabled", _BOOL, _BOOL_ACCEPTS,
             "G4 object tier: blocks committed in G2 are also put in an S3-compatible bucket, and lookups "
             "find blocks any instance of the same layout put there (see docs/objects.md)"),
    Variable("DYN_KVBM_OBJECT_BUCKET", "object_bucket", _BUCKET,
             "an S3 bucket name, 3-63 characters of a-z 0-9 . - (may hold {worker_id})",
             "Bucket of the G4 objects; {worker_id} is replaced by the instance name (a bucket per "
             "instance shares nothing); it must exist"),
    Variable("DYN_KVBM_OBJECT_ENDPOINT", "object_endpoint", _URL,
             "an http:// or https:// URL with a host and optional port (e.g. http://127.0.0.1:9000)",
             "S3-compatible endpoint URL (MinIO, Ceph, moto...); unset: AWS S3 of DYN_KVBM_OBJECT_REGION"),
    Variable("DYN_KVBM_OBJECT_REGION", "object_region", _REGION,
             "a region name of a-z 0-9 - (e.g. us-east-1)", "Region of the bucket"),
    Variable("DYN_KVBM_OBJECT_ACCESS_KEY", "object_access_key", _SECRET,
             "an access key id without blanks", "Access key of the object store; unset: the AWS "
             "credential chain (AWS_ACCESS_KEY_ID, ~/.aws, ...)"),
    Variable("DYN_KVBM_OBJECT_SECRET_KEY", "object_secret_key", _SECRET,
             "a secret key without blanks", "Secret key of the object store (never shown); unset: the "
             "AWS credential chain (AWS_SECRET_ACCESS_KEY, ~/.aws, ...)", secret=True),
    Variable("DYN_KVBM_OBJECT_NUM_BLOCKS", "object_num_blocks", _INT,
             "a whole number of blocks >= 1 (e.g. 100000)",
             "Blocks the leader's G4 index remembers (least recently used forgotten first; objects "
             "are never deleted by kvbm)", _count),
    Variable("DYN_KVBM_OBJECT_TRANSPORT", "object_transport", _word(OBJECT_TRANSPORTS), _one_of(OBJECT_TRANSPORTS),
             "kvbm's: how blocks move to and from the store: s3 (boto3) or nixl (NIXL's OBJ plugin, "
             "kvbm[cuda12]; its puts and gets stall while the store is down, see docs/objects.md); boto3 "
             "checks the bucket and answers lookups either way"),
    Variable("DYN_KVBM_OBJECT_WRITE_THROUGH", "object_write_through", _BOOL, _BOOL_ACCEPTS,
             "Put every block committed in G2 into the object store, as Dynamo does, so another "
             "instance finds a prefix computed once (false: only blocks seen twice, the disk tier's "
             "admission filter)"),
)

_BY_FIELD: dict[str, Variable] = {v.field: v for v in VARIABLES}
_BY_NAME: dict[str, Variable] = {n: v for v in VARIABLES for n in v.names}

# Dynamo variables kvbm accepts without effect (see docs/defaults.md). Where Dynamo parses the
# value strictly (a number, a port, one of a few words), kvbm checks it the same way; where Dynamo
# reads free text or treats anything but a truthy word as off, any value is accepted.
NO_EFFECT: tuple[NoEffect, ...] = (
    NoEffect("DYN_KVBM_LEADER_ZMQ_ACK_PORT",
             "kvbm's leader and ranks talk over one ZMQ socket (DYN_KVBM_LEADER_ENDPOINT or "
             "DYN_KVBM_LEADER_ZMQ_HOST/_PUB_PORT)", _INT, "a port number 1-65535", _port),
    NoEffect("DYN_KVBM_MAX_TRANSFER_BATCH_SIZE",
             "a rank copies each store or load op as one batch, coalesced into runs of consecutive blocks",
             _INT, "a whole number of blocks >= 1 (e.g. 16)", _count, aliases=("DYN_KVBM_TRANSFER_BATCH_SIZE",)),
    NoEffect("DYN_KVBM_DISK_ALLOCATOR_TYPE",
             "kvbm always fallocates its disk file and opens it O_DIRECT (see DYN_KVBM_DISK_DISABLE_O_DIRECT, "
             "DYN_KVBM_DISK_ZEROFILL_FALLBACK)", _word(DISK_ALLOCATORS), _one_of(DISK_ALLOCATORS)),
    NoEffect("DYN_KVBM_DISABLE_WRITE_COMBINED",
             "kvbm's host pool is shared memory pinned with cudaHostRegister, never write-combined",
             _BOOL, _BOOL_ACCEPTS),
    NoEffect("DYN_KVBM_KV_EVENTS_CONSOLIDATOR_MODE",
             "kvbm publishes its own G2/G3/G4 events on DYN_KVBM_KV_EVENTS_ENDPOINT; its consolidator is a command of its own (kvbm consolidate)",
             _word(CONSOLIDATOR_MODES), _one_of(CONSOLIDATOR_MODES)),
    NoEffect("DYN_KVBM_KV_EVENTS_ENABLE_CONSOLIDATOR",
             "kvbm's consolidator is a command of its own, started by the deployment (kvbm consolidate)"),
    NoEffect("DYN_KVBM_TRTLLM_ZMQ_PORT",
             "the port of the consolidator's TensorRT-LLM input; kvbm's consolidator (kvbm consolidate) subscribes to the streams it is given",
             _INT, "a port number 1-65535", _port),
    NoEffect("DYN_KVBM_NCCL_MAX_CTAS",
             "kvbm has no NCCL (replicated MLA) transfer path", _INT, "a whole number >= 1 (e.g. 8)", _count),
    NoEffect("DYN_KVBM_NCCL_MLA_MODE",
             "kvbm needs no NCCL for MLA: one copy of each block in the host pool every rank maps, "
             "written by rank 0 and loaded by every rank"),
    NoEffect("DYN_KVBM_CACHE_STATS_LOG_INTERVAL_SECS",
             "kvbm logs no periodic hit-rate line; the hit rates are gauges on /metrics (DYN_KVBM_METRICS)",
             _NUM, "a number of seconds > 0 (e.g. 5)", _positive),
    NoEffect("DYN_KVBM_HOST_OFFLOAD_PREFIX_MIN_PRIORITY",
             "kvbm has no retention-priority offload filter: every committed block is offered to G2",
             _INT, "a whole number from 0 to 100", lambda v: bool(0 <= v <= 100)),
    NoEffect("DYN_KVBM_ENABLE_RECORD", "kvbm has no recorder of connector calls"),
    NoEffect("DYN_KVBM_ENABLE_NUMA",
             "the leader allocates the host pool once for all ranks; its pages follow the kernel's NUMA policy"),
    NoEffect("DYN_KVBM_HOST_MEMORY_PROVIDER",
             "kvbm's SGLang integration is a HiCache storage backend sized by DYN_KVBM_CPU_CACHE_*"),
    NoEffect("DYN_KVBM_MANAGER_NAMESPACE",
             "kvbm's SGLang integration is a HiCache storage backend; it has no manager namespace"),
    NoEffect("DYN_KVBM_G2_CAPACITY_BYTES",
             "kvbm sizes the host pool with DYN_KVBM_CPU_CACHE_GB or DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS",
             _INT, "a whole number of bytes >= 0", _blocks),
    NoEffect("DYN_KVBM_G4_TRANSFER_TIMEOUT_SECS",
             "kvbm's object store calls time out after 5 s (see docs/objects.md)",
             _NUM, "a number of seconds > 0 (e.g. 30)", _positive),
    NoEffect("DYN_KVBM_G4_DRAIN_QUEUE_CAP",
             "kvbm's put queue holds 512 puts (see docs/objects.md)", _INT, "a whole number >= 1 (e.g. 512)",
             _count),
    NoEffect("DYN_KVBM_NIXL_BACKEND_",
             "kvbm does its own disk I/O and picks the object transport with DYN_KVBM_OBJECT_TRANSPORT",
             prefix=True),
)


def _no_effect_for(name: str) -> NoEffect | None:
    return next((e for e in NO_EFFECT if e.matches(name)), None)


SOURCE_DEFAULT = "default"
SOURCE_OVERRIDE = "override"
SOURCE_CONSTRUCTOR = "constructor"


def _env_source(name: str) -> str:
    return f"env {name}"


def default_run_dir() -> str:
    """``/tmp/kvbm-<uid>``: per user, so users never share sockets."""
    return f"/tmp/kvbm-{os.getuid()}"


# --------------------------------------------------------------------------


@dataclass(frozen=True)
class KvbmConfig:
    """The validated kvbm configuration (see :data:`VARIABLES` for each field).

    Constructing one directly validates it like :func:`load_config` does,
    except for file-system checks.
    """

    cpu_cache_gb: float | None = None
    cpu_cache_num_blocks: int | None = None
    disk_cache_gb: float | None = None
    disk_cache_num_blocks: int | None = None
    disk_cache_dir: str = "/tmp/"
    disk_cache_persist: bool = False
    disk_zerofill_fallback: bool = False
    disk_disable_o_direct: bool = False
    disable_disk_offload_filter: bool = False
    init_timeout_s: float = 120.0
    leader_grace_s: float = 0.0
    metrics_enabled: bool = False
    metrics_port: int = 6880
    leader_endpoint: str | None = None
    leader_zmq_host: str | None = None
    leader_zmq_pub_port: int = DEFAULT_PUB_PORT
    allow_non_loopback: bool = False
    run_dir: str = ""
    max_concurrent_transfers: int = 4
    kv_events_endpoint: str | None = None
    disk_bounce_blocks: int = 32
    cache_stats_max_requests: int = 1000
    heartbeat_interval_s: float = 0.25
    liveness_timeout_s: float = 1.5
    log_level: str = "INFO"
    index_replica: bool = True
    block_format: str = "auto"
    host_loads: str = "auto"
    object_enabled: bool = False
    object_bucket: str = DEFAULT_OBJECT_BUCKET
    object_endpoint: str | None = None
    object_region: str = "us-east-1"
    object_access_key: str | None = None
    object_secret_key: str | None = None
    object_num_blocks: int = 100_000
    object_transport: str = "s3"
    object_write_through: bool = True
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)
    # Set variables of NO_EFFECT (name -> value as given), shown by `kvbm config`; never used.
    no_effect: Mapping[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        sources = dict(self.sources)
        if self.run_dir == "":
            object.__setattr__(self, "run_dir", default_run_dir())
        for var in VARIABLES:
            value = getattr(self, var.field)
            if value is not None or _FIELD_DEFAULTS[var.field] is not None:
                var.validate(value)
        # Dynamo compat: ZMQ host / pub port select a tcp leader endpoint.
        if self.leader_endpoint is None and (
            self.leader_zmq_host is not None or self.leader_zmq_pub_port != DEFAULT_PUB_PORT
        ):
            object.__setattr__(self, "leader_endpoint", self._zmq_endpoint())
            if "leader_endpoint" not in sources:
                zmq_field = "leader_zmq_host" if self.leader_zmq_host else "leader_zmq_pub_port"
                sources["leader_endpoint"] = sources.get(zmq_field, SOURCE_CONSTRUCTOR)
        object.__setattr__(self, "sources", sources)
        self._check_cross_fields()

    # -- validation across fields ------------------------------------------

    def _zmq_endpoint(self) -> str:
        return _tcp_address(self.leader_zmq_host or "127.0.0.1", self.leader_zmq_pub_port)

    def _var_for(self, field_name: str) -> str:
        """The variable that set ``field_name`` (an alias or a ZMQ variable)."""
        src = self.sources.get(field_name, "")
        return src[len("env "):] if src.startswith("env ") else _BY_FIELD[field_name].name

    def _check_cross_fields(self) -> None:
        if self.liveness_timeout_s <= self.heartbeat_interval_s:
            raise ConfigError(
                f"DYN_KVBM_LIVENESS_TIMEOUT_SECS={repr(self.liveness_timeout_s)!r}: expected "
                f"more than DYN_KVBM_HEARTBEAT_INTERVAL_SECS ({self.heartbeat_interval_s!r})"
            )
        if self.kv_events_endpoint is not None:
            self._check_loopback("kv_events_endpoint", self.kv_events_endpoint, "KV events")
        if self.leader_endpoint is None:
            return
        ep = parse_endpoint(self.leader_endpoint)
        zmq_set = self.leader_zmq_host is not None or self.leader_zmq_pub_port != DEFAULT_PUB_PORT
        if zmq_set and parse_endpoint(self._zmq_endpoint()) != ep:
            raise ConfigError(
                f"DYN_KVBM_LEADER_ENDPOINT={self.leader_endpoint!r}: disagrees with "
                f"DYN_KVBM_LEADER_ZMQ_HOST/_PUB_PORT ({self._zmq_endpoint()}); set only one"
            )
        self._check_loopback("leader_endpoint", self.leader_endpoint, "leader")

    def _check_loopback(self, field_name: str, endpoint: str, what: str) -> None:
        """Refuse a non-loopback tcp ``endpoint`` unless DYN_KVBM_ALLOW_NON_LOOPBACK is set."""
        if self.allow_non_loopback or is_loopback_endpoint(endpoint):
            return
        var = self._var_for(field_name)
        value = self.leader_zmq_host if var == "DYN_KVBM_LEADER_ZMQ_HOST" else endpoint
        raise ConfigError(
            f"{var}={value!r}: expected a loopback address (127.0.0.0/8, ::1, localhost) "
            f"or an ipc:// path; the {what} socket is unauthenticated, set "
            "DYN_KVBM_ALLOW_NON_LOOPBACK=1 to allow other hosts"
        )

    # -- tiers -------------------------------------------------------------

    @property
    def has_cpu_tier(self) -> bool:
        """A host (G2) tier is configured (block override > 0 or GB > 0)."""
        return bool(self.cpu_cache_num_blocks or self.cpu_cache_gb)

    @property
    def has_disk_tier(self) -> bool:
        """A disk (G3) tier is configured (block override > 0 or GB > 0)."""
        return bool(self.disk_cache_num_blocks or self.disk_cache_gb)

    def host_blocks(self, block_bytes: int) -> int:
        """Host (G2) blocks: the override if > 0, else floor(GB·1e9 / block_bytes).

        May be 0 when the GB size is smaller than one block; callers decide
        whether that is an error.
        """
        return _blocks_for(self.cpu_cache_num_blocks, self.cpu_cache_gb, block_bytes)

    def disk_blocks(self, block_bytes: int) -> int:
        """Disk (G3) blocks, same rule as :meth:`host_blocks`."""
        return _blocks_for(self.disk_cache_num_blocks, self.disk_cache_gb, block_bytes)

    def host_size(self, block_bytes: int) -> TierSize:
        """Host (G2) pool size and the variable behind it (disk-only: the bounce slots)."""
        if not self.has_cpu_tier:
            return self._size("disk_bounce_blocks", self.disk_bounce_blocks, block_bytes)
        if self.cpu_cache_num_blocks:
            return self._size("cpu_cache_num_blocks", self.cpu_cache_num_blocks, block_bytes)
        return self._size("cpu_cache_gb", self.host_blocks(block_bytes), block_bytes)

    def disk_size(self, block_bytes: int) -> TierSize:
        """Disk (G3) size and the variable behind it (0 blocks when there is no disk tier)."""
        field_name = "disk_cache_num_blocks" if self.disk_cache_num_blocks else "disk_cache_gb"
        return self._size(field_name, self.disk_blocks(block_bytes), block_bytes)

    def _size(self, field_name: str, num_blocks: int, block_bytes: int) -> TierSize:
        var = _BY_FIELD[field_name]
        value = getattr(self, field_name)
        shown = "(unset)" if value is None else var.kind.fmt(value)
        return TierSize(self._var_for(field_name), shown, num_blocks, block_bytes)

    def require_tier(self) -> None:
        """Raise ConfigError unless a host or disk tier is configured."""
        if not (self.has_cpu_tier or self.has_disk_tier):
            raise ConfigError(
                "no cache tier configured: set DYN_KVBM_CPU_CACHE_GB (or "
                "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS) and/or DYN_KVBM_DISK_CACHE_GB (or "
                "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS) to a value > 0"
            )

    def object_bucket_for(self, instance: str) -> str:
        """The bucket of ``instance``: DYN_KVBM_OBJECT_BUCKET with ``{worker_id}`` replaced.

        Raises :class:`ConfigError` when the instance name does not make a valid bucket name.
        """
        bucket = self.object_bucket.replace(WORKER_ID, instance.lower())
        if not _BUCKET_RE.fullmatch(bucket):
            raise ConfigError(f"DYN_KVBM_OBJECT_BUCKET={self.object_bucket!r}: expected a valid bucket name once "
                              f"{WORKER_ID} is the instance name {instance!r}, got {bucket!r}")
        return bucket

    # -- output ------------------------------------------------------------

    def to_env(self) -> dict[str, str]:
        """Environment variables that reproduce this configuration.

        ``load_config(cfg.to_env()) == cfg``. A spawner should drop inherited
        ``DYN_KVBM_*`` variables before applying these, since unset optional
        fields are left out rather than written empty.
        """
        env: dict[str, str] = {}
        for var in VARIABLES:
            value = getattr(self, var.field)
            if value is not None:
                env[var.name] = var.kind.fmt(value)
        # Write the pub port only where it reproduces the endpoint: a set pub
        # port selects tcp://host:pub_port on reload.
        if self.leader_endpoint is None or (
            parse_endpoint(self.leader_endpoint) != parse_endpoint(self._zmq_endpoint())
        ):
            del env["DYN_KVBM_LEADER_ZMQ_PUB_PORT"]
        return env

    def source_of(self, field_name: str) -> str:
        """Where a field's value came from: "env NAME", "default", "override"..."""
        if field_name in self.sources:
            return self.sources[field_name]
        value = getattr(self, field_name)
        return SOURCE_DEFAULT if value == _default_value(field_name) else SOURCE_CONSTRUCTOR

    def describe(self) -> list[tuple[str, str, str]]:
        """(variable, effective value, source) for every variable, table order, then the set
        Dynamo variables that have no effect (:data:`NO_EFFECT`)."""
        rows = []
        for var in VARIABLES:
            value = getattr(self, var.field)
            shown = "(unset)" if value is None else "<hidden>" if var.secret else var.kind.fmt(value)
            rows.append((var.name, shown, self.source_of(var.field)))
        rows.extend((name, value, f"{_env_source(name)}, no effect in kvbm")
                    for name, value in sorted(self.no_effect.items()))
        return rows

    def replace(self, **changes: Any) -> KvbmConfig:
        """A validated copy with ``changes``; changed fields get source "override"."""
        if "sources" in changes:
            raise TypeError("replace() does not take 'sources'")
        zmq_changed = {"leader_zmq_host", "leader_zmq_pub_port"} & changes.keys()
        if zmq_changed and "leader_endpoint" not in changes and self.leader_endpoint == (
            self._zmq_endpoint()
        ):
            # The endpoint followed the ZMQ variables: re-derive it from the new ones.
            changes["leader_endpoint"] = None
        sources = {**self.sources, **{name: SOURCE_OVERRIDE for name in changes}}
        return dataclasses.replace(self, sources=sources, **changes)


def format_bytes(n: float) -> str:
    """Decimal human size (kvbm's GB are 1e9 bytes): ``512 B``, ``25.3 GB``, ``1.0e+21 GB``."""
    if n < 1000:
        return f"{n:.0f} B"
    for unit, scale in (("kB", 1e3), ("MB", 1e6), ("GB", 1e9), ("TB", 1e12), ("PB", 1e15)):
        if n < scale * 1000:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1e9:.1e} GB"  # absurd requests: keep the unit of the GB variables


@dataclass(frozen=True)
class TierSize:
    """A tier's size as configured: the variable that sets it, its value, and the bytes it means.

    Used to refuse, in one line, a size the machine cannot hold before anything is allocated.
    """

    variable: str
    value: str  # as the user wrote it (the typed value, formatted back)
    num_blocks: int
    block_bytes: int

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.block_bytes

    def too_big(self, what: str, where: str, free_bytes: int, hint: str = "") -> str:
        """The one-line refusal: ``VAR=value asks for X of WHAT; WHERE has Y free; accepted: ...``."""
        if self.variable.endswith("_GB"):
            accepted = f"at most {format_bytes(free_bytes)}"
        else:
            accepted = f"at most {free_bytes // self.block_bytes} blocks of {self.block_bytes} B"
        return (f"{self.variable}={self.value} asks for {format_bytes(self.nbytes)} of {what}; "
                f"{where} has {format_bytes(free_bytes)} free; accepted: {accepted}{hint}")


def _blocks_for(override: int | None, gb: float | None, block_bytes: int) -> int:
    if block_bytes <= 0:
        raise ValueError(f"block_bytes must be > 0, got {block_bytes}")
    if override:
        return override
    if gb:
        return int(gb * 1e9 // block_bytes)
    return 0


_FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(KvbmConfig)}


def _default_value(field_name: str) -> Any:
    return default_run_dir() if field_name == "run_dir" else _FIELD_DEFAULTS[field_name]


# --------------------------------------------------------------------------


def load_config(env: Mapping[str, str] | None = None, *, require_tier: bool = True) -> KvbmConfig:
    """Parse and validate every ``DYN_KVBM_*`` variable of ``env``.

    ``env`` defaults to ``os.environ``; this is the only place in kvbm that
    reads it for ``DYN_KVBM_*``. Raises :class:`ConfigError` on the first bad
    value (table order), on conflicting aliases, on a missing or unwritable
    disk cache directory when a disk tier is configured, and, with
    ``require_tier``, when neither a host nor a disk tier is configured.
    Unknown ``DYN_KVBM_*`` variables are logged as a warning, not an error.
    """
    if env is None:
        env = os.environ
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for var in VARIABLES:
        found = _read(var, env)
        if found is not None:
            values[var.field] = found[1]
            sources[var.field] = _env_source(found[0])
    _resolve_leader_endpoint(env, values, sources)
    no_effect = _read_no_effect(env)
    _warn_unknown(env)
    cfg = KvbmConfig(**values, sources=sources, no_effect=no_effect)
    if cfg.has_disk_tier:
        _check_disk_dir(cfg)
    if require_tier:
        cfg.require_tier()
    return cfg


def _read(rule: Variable | NoEffect, env: Mapping[str, str]) -> tuple[str, Any] | None:
    """(name it was given under, checked value) of ``rule`` in ``env``, None if unset.

    Aliases given together must agree: which one wins would otherwise be a guess.
    """
    parsed = [(name, env[name], rule.parse(env[name], name)) for name in rule.names if name in env]
    if len({value for _, _, value in parsed}) > 1:
        shown = " and ".join(f"{name}={raw!r}" for name, raw, _ in parsed)
        raise ConfigError(f"{shown}: expected equal values (they are aliases); set only one")
    return (parsed[0][0], parsed[0][2]) if parsed else None


def _read_no_effect(env: Mapping[str, str]) -> dict[str, str]:
    """Check every set :data:`NO_EFFECT` variable; return them (name -> raw value) for `kvbm config`."""
    found: dict[str, str] = {}
    for entry in NO_EFFECT:
        if entry.prefix:
            for name in sorted(n for n in env if entry.matches(n)):
                entry.parse(env[name], name)
                found[name] = env[name]
        elif _read(entry, env) is not None:
            found.update((n, env[n]) for n in entry.names if n in env)
    if found:
        log.warning("Dynamo variables that have no effect in kvbm, ignored: %s (docs/defaults.md says why)",
                    ", ".join(sorted(found)))
    return found


def _resolve_leader_endpoint(
    env: Mapping[str, str], values: dict[str, Any], sources: dict[str, str]
) -> None:
    """Dynamo compat: a set ZMQ host or pub port means tcp://host:pub_port."""
    zmq_names = [n for n in ("DYN_KVBM_LEADER_ZMQ_HOST", "DYN_KVBM_LEADER_ZMQ_PUB_PORT")
                 if n in env]
    if not zmq_names:
        return
    host = values.get("leader_zmq_host") or "127.0.0.1"
    derived = _tcp_address(host, values.get("leader_zmq_pub_port", DEFAULT_PUB_PORT))
    given = values.get("leader_endpoint")
    if given is None:
        values["leader_endpoint"] = derived
        sources["leader_endpoint"] = _env_source(zmq_names[0])
    elif parse_endpoint(given) != parse_endpoint(derived):
        zmq = " ".join(f"{n}={env[n]!r}" for n in zmq_names)
        raise ConfigError(
            f"DYN_KVBM_LEADER_ENDPOINT={env['DYN_KVBM_LEADER_ENDPOINT']!r}: disagrees with "
            f"{zmq} (which select {derived}); set only one"
        )


def _check_disk_dir(cfg: KvbmConfig) -> None:
    path = cfg.disk_cache_dir
    if not (os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)):
        var = cfg._var_for("disk_cache_dir")
        raise ConfigError(f"{var}={path!r}: expected an existing, writable directory")


def _warn_unknown(env: Mapping[str, str]) -> None:
    unknown = sorted(n for n in env if n.startswith(PREFIX) and n not in _BY_NAME and _no_effect_for(n) is None)
    if unknown:
        # Compare without the shared prefix, else everything looks close.
        suffixes = [n[len(PREFIX):] for n in _BY_NAME]
        described = []
        for name in unknown:
            close = difflib.get_close_matches(name[len(PREFIX):], suffixes, n=1, cutoff=0.75)
            described.append(f"{name} (did you mean {PREFIX}{close[0]}?)" if close else name)
        log.warning("unknown DYN_KVBM_* variables, ignored: %s", ", ".join(described))


def markdown_table() -> str:
    """The README configuration tables: variable, default, meaning; then the Dynamo variables
    accepted without effect: variable, accepted values, why."""
    lines = ["| Variable | Default | Meaning |", "|---|---|---|"]
    for var in VARIABLES:
        if var.default_text is not None:
            default = var.default_text
        else:
            value = _FIELD_DEFAULTS[var.field]
            default = "unset" if value is None else var.kind.fmt(value)
        lines.append(f"| {_md_name(var.name, var.aliases)} | `{default}` | {var.meaning} |")
    lines += ["", "Dynamo variables kvbm accepts without effect (a set value is checked, then ignored; "
              "a warning names them):", "", "| Variable | Accepted | Why it has no effect in kvbm |", "|---|---|---|"]
    for entry in NO_EFFECT:
        name = entry.name + "*" if entry.prefix else entry.name
        lines.append(f"| {_md_name(name, entry.aliases)} | {entry.accepts} | {entry.why} |")
    return "\n".join(lines) + "\n"


def _md_name(name: str, aliases: tuple[str, ...]) -> str:
    return f"`{name}`" + "".join(f" (alias `{a}`)" for a in aliases)
