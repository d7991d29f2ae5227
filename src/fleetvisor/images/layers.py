"""The host's layer cache: each layer unpacked once, shared by every instance and agent process.

Layout under `root` (one per host):

    layers/<hex>/     an unpacked layer, used read-only as an overlayfs lowerdir
    locks/<hex>.lock  flock held while a layer is unpacked or evicted
    state.json        sizes, last use, use counts, which instances use which layers, metrics
    state.lock        flock held for every read-modify-write of state.json
    trash/            evicted layers, renamed here before they are deleted

A layer directory exists only once it is complete (unpack_layer renames it into place),
so "the directory exists" means "the layer is ready". Locks are always taken in the
order layer lock, then state lock; eviction only try-locks layers, so nothing deadlocks.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from fleetvisor.clock import Clock, RealClock
from fleetvisor.errors import InvalidInput, NotFound
from fleetvisor.images.unpack import UnpackLimits, unpack_layer

DIGEST_RE = re.compile(r"^(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})$")
STATE_VERSION = 1
_METRICS = (
    "hits",
    "misses",
    "bytes_unpacked",
    "bytes_saved",
    "evictions",
    "bytes_evicted",
    "unpack_seconds",
)

BlobSource = Path | Callable[[str], Path]
"""Where a layer's blob is: a path, or a function from digest to path (e.g. store.blob_path)."""


class LayerNotCached(NotFound):
    """A layer was asked for by digest before `ensure` unpacked it on this host."""


def check_digest(digest: str) -> str:
    """Return `digest` if it is "sha256:<64 hex>" or "sha512:<128 hex>"; else InvalidInput."""
    if not DIGEST_RE.match(digest):
        raise InvalidInput(
            f"layer digest {digest!r} is malformed; expected 'sha256:' and 64 lowercase hex digits"
        )
    return digest


def disk_usage(path: Path) -> int:
    """Bytes allocated under `path` (like `du -s`): hard-linked inodes count once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in [".", *dirnames, *filenames]:
            st = os.lstat(os.path.join(dirpath, name))
            key = (st.st_dev, st.st_ino)
            if key not in seen:
                seen.add(key)
                total += st.st_blocks * 512
    return total


@contextlib.contextmanager
def _flock(path: Path, *, blocking: bool = True) -> Iterator[bool]:
    """Hold an exclusive flock on `path` (created if missing); yields False if busy and
    non-blocking. Each call opens its own descriptor, so threads exclude each other too."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _empty_state() -> dict[str, Any]:
    return {
        "version": STATE_VERSION,
        "layers": {},
        "instances": {},
        "metrics": {name: 0 for name in _METRICS},
    }


class LayerCache:
    """Unpacked layers by digest under `root`, shared by all instances and processes of a host.

    `budget_bytes` (None = unlimited) is enforced after each new unpack by evicting the
    least recently used layers that no instance holds. Call `acquire` before `ensure` when
    starting an instance: a held layer cannot be evicted between its unpack and its mount.
    """

    def __init__(
        self,
        root: Path,
        budget_bytes: int | None = None,
        *,
        allow_setuid: bool = False,
        limits: UnpackLimits = UnpackLimits(),
        verify_digests: bool = True,
        clock: Clock | None = None,
    ) -> None:
        if budget_bytes is not None and budget_bytes < 0:
            raise InvalidInput(f"layer cache budget {budget_bytes} must be >= 0 bytes or None")
        self.root = Path(root)
        self.budget_bytes = budget_bytes
        self.allow_setuid = allow_setuid
        self.limits = limits
        self.verify_digests = verify_digests
        self.clock: Clock = clock or RealClock()
        for sub in ("layers", "locks", "trash"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._state_file = self.root / "state.json"
        self._state_lock = self.root / "state.lock"
        self._empty_trash()

    # ----------------------------------------------------------------- paths

    def path(self, digest: str) -> Path:
        """Directory of the unpacked layer `digest` (it may not exist yet)."""
        return self.root / "layers" / check_digest(digest).partition(":")[2]

    def has(self, digest: str) -> bool:
        """True if the layer is unpacked and ready on this host."""
        return self.path(digest).is_dir()

    def _lock_path(self, digest: str) -> Path:
        return self.root / "locks" / f"{digest.partition(':')[2]}.lock"

    # ----------------------------------------------------------------- ensure

    def ensure(self, digest: str, blob: BlobSource, media_type: str) -> Path:
        """Return the unpacked layer `digest`, unpacking it from `blob` if no process has yet.

        Concurrent callers (threads or processes) wait on the layer's lock; only the first
        unpacks, the others find it done and count a hit.
        """
        dest = self.path(digest)
        unpacked = False
        with _flock(self._lock_path(digest)):
            if dest.is_dir():
                self._record_hit(digest, dest)
            else:
                self._remove_stale_temps(dest)
                blob_path = blob(digest) if callable(blob) else Path(blob)
                stats = unpack_layer(
                    blob_path,
                    media_type,
                    dest,
                    allow_setuid=self.allow_setuid,
                    limits=self.limits,
                    verify_digest=digest if self.verify_digests else None,
                )
                size = disk_usage(dest)
                now = self.clock.now()
                with self._transaction() as state:
                    state["layers"][digest] = {
                        "size": size,
                        "media_type": media_type,
                        "unpacked_at": now,
                        "last_used": now,
                        "uses": 1,
                        "unpack_seconds": round(stats.seconds, 6),
                    }
                    metrics = state["metrics"]
                    metrics["misses"] += 1
                    metrics["bytes_unpacked"] += size
                    metrics["unpack_seconds"] += stats.seconds
                unpacked = True
        if unpacked and self.budget_bytes is not None:
            self.evict(self.budget_bytes, keep=[digest])
        return dest

    def _record_hit(self, digest: str, dest: Path) -> None:
        """Count a hit; adopt a layer left unrecorded by a process that died after its rename."""
        with self._transaction() as state:
            entry = state["layers"].get(digest)
            if entry is None:
                entry = state["layers"][digest] = {
                    "size": disk_usage(dest),
                    "media_type": "",
                    "unpacked_at": self.clock.now(),
                    "last_used": self.clock.now(),
                    "uses": 0,
                    "unpack_seconds": 0.0,
                }
            entry["uses"] += 1
            entry["last_used"] = self.clock.now()
            state["metrics"]["hits"] += 1
            state["metrics"]["bytes_saved"] += entry["size"]

    def _remove_stale_temps(self, dest: Path) -> None:
        """Delete half-built temp dirs of this layer (their owner died: we hold its lock)."""
        for stale in dest.parent.glob(f".{dest.name}.unpack-*"):
            shutil.rmtree(stale, ignore_errors=True)

    # ----------------------------------------------------------------- instances

    def acquire(self, instance_id: str, digests: Iterable[str]) -> None:
        """Record that `instance_id` uses these layers (replacing what it held): they are pinned
        against eviction until `release`. Acquire before `ensure` to pin layers being pulled."""
        wanted = list(dict.fromkeys(check_digest(d) for d in digests))
        if not instance_id:
            raise InvalidInput("instance id must not be empty")
        now = self.clock.now()
        with self._transaction() as state:
            state["instances"][instance_id] = wanted
            for digest in wanted:
                if digest in state["layers"]:
                    state["layers"][digest]["last_used"] = now

    def release(self, instance_id: str) -> list[str]:
        """Forget `instance_id`'s layers (idempotent); returns the digests it held."""
        now = self.clock.now()
        with self._transaction() as state:
            held: list[str] = state["instances"].pop(instance_id, [])
            for digest in held:
                if digest in state["layers"]:
                    state["layers"][digest]["last_used"] = now
        return held

    def users(self, digest: str) -> list[str]:
        """Instance ids that currently hold layer `digest`."""
        state = self._read()
        return sorted(i for i, held in state["instances"].items() if digest in held)

    # ----------------------------------------------------------------- eviction

    def evict(self, budget_bytes: int | None = None, *, keep: Iterable[str] = ()) -> list[str]:
        """Delete unused layers, least recently used first (then least used), until the cache
        fits `budget_bytes` (default: the cache's budget). Layers an instance holds, layers in
        `keep` and layers another process is unpacking are never evicted."""
        budget = self.budget_bytes if budget_bytes is None else budget_bytes
        if budget is None:
            return []
        keep_set = set(keep)
        state = self._read()
        total = sum(entry["size"] for entry in state["layers"].values())
        held = _held(state)
        candidates = sorted(
            (d for d in state["layers"] if d not in held and d not in keep_set),
            key=lambda d: (state["layers"][d]["last_used"], state["layers"][d]["uses"]),
        )
        evicted: list[str] = []
        for digest in candidates:
            if total <= budget:
                break
            freed = self._evict_one(digest)
            if freed is not None:
                total -= freed
                evicted.append(digest)
        return evicted

    def _evict_one(self, digest: str) -> int | None:
        """Remove one layer if it is still unused and nobody holds its lock; bytes freed."""
        trash: Path | None = None
        with _flock(self._lock_path(digest), blocking=False) as locked:
            if not locked:
                return None
            with self._transaction() as state:
                entry = state["layers"].get(digest)
                if entry is None or digest in _held(state):
                    return None  # changed since we looked
                del state["layers"][digest]
                state["metrics"]["evictions"] += 1
                state["metrics"]["bytes_evicted"] += entry["size"]
                trash = self.root / "trash" / f"{digest.partition(':')[2]}.{secrets.token_hex(4)}"
                with contextlib.suppress(FileNotFoundError):
                    os.rename(self.path(digest), trash)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        return int(entry["size"])

    def _empty_trash(self) -> None:
        for leftover in (self.root / "trash").iterdir():
            shutil.rmtree(leftover, ignore_errors=True)

    # ----------------------------------------------------------------- overlay, metrics

    def overlay_lowerdirs(self, digests: Iterable[str]) -> str:
        """The overlayfs `lowerdir=` value for layers given base first (manifest order):
        topmost layer first, colon-separated. Every layer must have been ensured."""
        dirs: list[str] = []
        for digest in digests:
            path = self.path(digest)
            if not path.is_dir():
                raise LayerNotCached(
                    f"layer {digest} is not unpacked on this host; call ensure() first"
                )
            text = str(path)
            if any(c in text for c in ":,\\"):
                raise InvalidInput(
                    f"layer cache root {self.root} contains ':', ',' or '\\', which overlayfs "
                    "mount options cannot carry; choose a plain path"
                )
            dirs.append(text)
        if not dirs:
            raise InvalidInput("an overlay needs at least one layer")
        return ":".join(reversed(dirs))

    def snapshot(self) -> dict[str, Any]:
        """Cache contents and counters for the agent's heartbeat (JSON-serialisable)."""
        state = self._read()
        layers = state["layers"]
        metrics = state["metrics"]
        lookups = metrics["hits"] + metrics["misses"]
        held = _held(state)
        return {
            "root": str(self.root),
            "budget_bytes": self.budget_bytes,
            "cached_layers": sorted(layers),
            "layer_sizes": {d: e["size"] for d, e in sorted(layers.items())},
            "layers_in_use": sorted(d for d in layers if d in held),
            "total_bytes": sum(e["size"] for e in layers.values()),
            "instances": len(state["instances"]),
            "hits": metrics["hits"],
            "misses": metrics["misses"],
            "hit_ratio": metrics["hits"] / lookups if lookups else 0.0,
            "bytes_unpacked": metrics["bytes_unpacked"],
            "bytes_saved": metrics["bytes_saved"],
            "evictions": metrics["evictions"],
            "bytes_evicted": metrics["bytes_evicted"],
            "unpack_seconds": round(metrics["unpack_seconds"], 6),
        }

    def layer_info(self, digest: str) -> dict[str, Any]:
        """What the cache records about one layer: size, last_used, uses, unpack time."""
        entry = self._read()["layers"].get(check_digest(digest))
        if entry is None:
            raise LayerNotCached(f"layer {digest} is not in the cache at {self.root}")
        return dict(entry)

    # ----------------------------------------------------------------- state file

    def _read(self) -> dict[str, Any]:
        with _flock(self._state_lock):
            return self._load()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[dict[str, Any]]:
        """Read-modify-write of state.json under the state lock; written only on success."""
        with _flock(self._state_lock):
            state = self._load()
            yield state
            self._store(state)

    def _load(self) -> dict[str, Any]:
        """Read state.json (caller holds the state lock); rebuild and save it if unusable."""
        try:
            state: dict[str, Any] = json.loads(self._state_file.read_text())
            if state.get("version") == STATE_VERSION:
                for name in _METRICS:
                    state["metrics"].setdefault(name, 0)
                return state
        except (FileNotFoundError, json.JSONDecodeError, AttributeError):
            pass
        state = self._rebuild()
        self._store(state)
        return state

    def _rebuild(self) -> dict[str, Any]:
        """Recreate state from the layer directories (first use, or a damaged state file)."""
        state = _empty_state()
        now = self.clock.now()
        for path in sorted((self.root / "layers").iterdir()):
            if path.name.startswith(".") or not path.is_dir():
                continue
            algorithm = "sha256" if len(path.name) == 64 else "sha512"
            state["layers"][f"{algorithm}:{path.name}"] = {
                "size": disk_usage(path),
                "media_type": "",
                "unpacked_at": now,
                "last_used": now,
                "uses": 0,
                "unpack_seconds": 0.0,
            }
        return state

    def _store(self, state: dict[str, Any]) -> None:
        tmp = self._state_file.with_name(f".state.json.{os.getpid()}.{secrets.token_hex(3)}")
        data = json.dumps(state, indent=1, sort_keys=True).encode()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, self._state_file)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def _held(state: dict[str, Any]) -> set[str]:
    """Digests held by at least one instance."""
    return {digest for held in state["instances"].values() for digest in held}
