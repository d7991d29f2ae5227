"""The host layer cache: unpack once (also across racing processes), pin layers for instances,
evict least recently used unpinned layers, and keep counters every process agrees on."""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import json
import multiprocessing
import os
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest

from fleetvisor.errors import InvalidInput
from fleetvisor.images.layers import LayerCache, LayerNotCached, disk_usage
from fleetvisor.images.unpack import LayerDigestMismatch, UnsafeLayerMember

TAR_GZ = "application/vnd.oci.image.layer.v1.tar+gzip"


class FakeClock:
    """Wall time the test sets by hand (LayerCache only reads now())."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.t = start

    def now(self) -> float:
        return self.t

    def monotonic(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.t += seconds


def make_layer(directory: Path, files: dict[str, bytes]) -> tuple[str, Path]:
    """A gzip layer blob holding `files`; returns (digest, path)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_600_000_000
            tar.addfile(info, io.BytesIO(data))
    blob = gzip.compress(buf.getvalue(), mtime=0)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / digest.partition(":")[2]
    path.write_bytes(blob)
    return digest, path


class CountingBlob:
    """A digest -> path callable that logs every call (picklable, for spawned processes)."""

    def __init__(self, path: Path, log: Path) -> None:
        self.path, self.log = path, log

    def __call__(self, digest: str) -> Path:
        with open(self.log, "a") as out:
            out.write(f"{os.getpid()} {digest}\n")
        return self.path


def _race_worker(root: str, digest: str, blob: CountingBlob, barrier: Any, out: Any) -> None:
    cache = LayerCache(Path(root))
    barrier.wait(timeout=60)
    started = time.monotonic()
    path = cache.ensure(digest, blob, TAR_GZ)
    out.put((os.getpid(), str(path), time.monotonic() - started))


@pytest.fixture
def blobs(tmp_path: Path) -> Path:
    return tmp_path / "blobs"


# --------------------------------------------------------------------------- unpack once


def test_ensure_unpacks_once_then_hits(tmp_path: Path, blobs: Path) -> None:
    digest, blob = make_layer(blobs, {"bin/hello": b"hi" * 5000, "etc/os-release": b"x"})
    cache = LayerCache(tmp_path / "cache")
    path = cache.ensure(digest, blob, TAR_GZ)
    assert path == tmp_path / "cache" / "layers" / digest.partition(":")[2]
    assert (path / "bin/hello").read_bytes() == b"hi" * 5000
    assert cache.ensure(digest, lambda d: pytest.fail("must not read the blob again"), TAR_GZ)
    assert cache.ensure(digest, blob, TAR_GZ) == path

    size = disk_usage(path)
    snap = cache.snapshot()
    assert snap["cached_layers"] == [digest]
    assert snap["layer_sizes"] == {digest: size}
    assert (snap["hits"], snap["misses"]) == (2, 1)
    assert snap["bytes_unpacked"] == size
    assert snap["bytes_saved"] == 2 * size
    assert snap["total_bytes"] == size
    assert snap["hit_ratio"] == pytest.approx(2 / 3)
    json.dumps(snap)  # heartbeat-ready

    again = LayerCache(tmp_path / "cache")  # another agent process on the same host
    assert again.snapshot()["hits"] == 2
    assert again.layer_info(digest)["uses"] == 3


def test_unpack_once_across_four_processes(tmp_path: Path, blobs: Path) -> None:
    files = {f"usr/share/doc/pkg{i}/file{j}": os.urandom(200) for i in range(60) for j in range(25)}
    digest, path = make_layer(blobs, files)
    log = tmp_path / "blob-calls.log"
    blob = CountingBlob(path, log)
    root = tmp_path / "cache"
    ctx = multiprocessing.get_context("spawn")  # independent interpreters, like separate agents
    barrier, out = ctx.Barrier(4), ctx.Queue()
    procs = [
        ctx.Process(target=_race_worker, args=(str(root), digest, blob, barrier, out))
        for _ in range(4)
    ]
    for proc in procs:
        proc.start()
    try:
        results = [out.get(timeout=120) for _ in procs]
    finally:
        for proc in procs:
            proc.join(timeout=60)
    assert all(proc.exitcode == 0 for proc in procs)
    assert len({pid for pid, _, _ in results}) == 4
    assert {p for _, p, _ in results} == {str(root / "layers" / digest.partition(":")[2])}
    assert len(log.read_text().splitlines()) == 1, "the blob was read by more than one process"
    snap = LayerCache(root).snapshot()
    assert (snap["misses"], snap["hits"]) == (1, 3)
    assert snap["bytes_saved"] == 3 * snap["layer_sizes"][digest]
    assert os.listdir(root / "layers") == [digest.partition(":")[2]]  # no temp dirs left
    layer = root / "layers" / digest.partition(":")[2]
    assert sum(len(fs) for _, _, fs in os.walk(layer)) == len(files)
    print("ensure() seconds per process:", sorted(round(s, 3) for _, _, s in results))


# --------------------------------------------------------------------------- pinning, eviction


def test_evict_never_removes_a_layer_in_use(tmp_path: Path, blobs: Path) -> None:
    clock = FakeClock()
    cache = LayerCache(tmp_path / "cache", clock=clock)
    base, base_blob = make_layer(blobs, {"base": os.urandom(20_000)})
    app, app_blob = make_layer(blobs, {"app": os.urandom(20_000)})
    other, other_blob = make_layer(blobs, {"other": os.urandom(20_000)})
    cache.acquire("inst-a", [base, app])  # pin before pulling
    for digest, blob in ((base, base_blob), (app, app_blob), (other, other_blob)):
        clock.t += 10
        cache.ensure(digest, blob, TAR_GZ)
    cache.acquire("inst-b", [base])

    assert cache.evict(0) == [other]
    assert cache.has(base) and cache.has(app) and not cache.has(other)
    assert cache.users(base) == ["inst-a", "inst-b"]

    assert cache.release("inst-a") == [base, app]
    assert cache.release("inst-a") == []  # idempotent
    assert cache.evict(0) == [app]  # base is still held by inst-b
    assert cache.has(base)
    cache.release("inst-b")
    assert cache.evict(0) == [base]
    snap = cache.snapshot()
    assert snap["cached_layers"] == [] and snap["total_bytes"] == 0
    assert snap["evictions"] == 3 and snap["bytes_evicted"] > 60_000
    assert os.listdir(tmp_path / "cache" / "trash") == []


def test_evict_least_recently_used_first_until_under_budget(tmp_path: Path, blobs: Path) -> None:
    clock = FakeClock()
    cache = LayerCache(tmp_path / "cache", clock=clock)
    digests = []
    for name in ("old", "middle", "new"):
        clock.t += 10
        digest, blob = make_layer(blobs, {name: os.urandom(40_000)})
        cache.ensure(digest, blob, TAR_GZ)
        digests.append(digest)
    old, middle, new = digests
    clock.t += 10
    cache.acquire("inst-x", [old])  # using "old" again makes it the most recent...
    cache.release("inst-x")  # ...and it stays recent after release
    sizes = cache.snapshot()["layer_sizes"]
    budget = sizes[old] + sizes[new] + 1
    assert cache.evict(budget) == [middle]
    assert cache.evict(budget) == []
    assert cache.evict(0, keep=[new]) == [old]
    assert cache.snapshot()["cached_layers"] == [new]


def test_equal_last_use_evicts_least_used_first(tmp_path: Path, blobs: Path) -> None:
    clock = FakeClock()
    cache = LayerCache(tmp_path / "cache", clock=clock)
    popular, popular_blob = make_layer(blobs, {"p": b"p" * 10_000})
    rare, rare_blob = make_layer(blobs, {"r": b"r" * 10_000})
    cache.ensure(popular, popular_blob, TAR_GZ)
    cache.ensure(popular, popular_blob, TAR_GZ)
    cache.ensure(rare, rare_blob, TAR_GZ)
    assert cache.evict(cache.snapshot()["layer_sizes"][popular]) == [rare]


def test_budget_is_enforced_after_each_unpack(tmp_path: Path, blobs: Path) -> None:
    clock = FakeClock()
    first, first_blob = make_layer(blobs, {"a": os.urandom(50_000)})
    second, second_blob = make_layer(blobs, {"b": os.urandom(50_000)})
    probe = LayerCache(tmp_path / "probe")
    budget = disk_usage(probe.ensure(first, first_blob, TAR_GZ)) + 4096
    cache = LayerCache(tmp_path / "cache", budget_bytes=budget, clock=clock)
    cache.ensure(first, first_blob, TAR_GZ)
    clock.t += 1
    cache.ensure(second, second_blob, TAR_GZ)  # over budget: the older, unused layer goes
    assert cache.snapshot()["cached_layers"] == [second]


def test_evict_skips_a_layer_another_process_is_working_on(tmp_path: Path, blobs: Path) -> None:
    cache = LayerCache(tmp_path / "cache")
    digest, blob = make_layer(blobs, {"a": b"a"})
    cache.ensure(digest, blob, TAR_GZ)
    lock = tmp_path / "cache" / "locks" / f"{digest.partition(':')[2]}.lock"
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert cache.evict(0) == []
    assert cache.evict(0) == [digest]


def test_no_budget_means_no_eviction(tmp_path: Path, blobs: Path) -> None:
    cache = LayerCache(tmp_path / "cache")
    digest, blob = make_layer(blobs, {"a": b"a"})
    cache.ensure(digest, blob, TAR_GZ)
    assert cache.evict() == []
    assert cache.has(digest)


# --------------------------------------------------------------------------- overlay, errors


def test_overlay_lowerdirs_topmost_first(tmp_path: Path, blobs: Path) -> None:
    cache = LayerCache(tmp_path / "cache")
    base, base_blob = make_layer(blobs, {"base": b"1"})
    top, top_blob = make_layer(blobs, {"top": b"2"})
    cache.ensure(base, base_blob, TAR_GZ)
    cache.ensure(top, top_blob, TAR_GZ)
    assert cache.overlay_lowerdirs([base, top]) == f"{cache.path(top)}:{cache.path(base)}"
    missing = "sha256:" + "ab" * 32
    with pytest.raises(LayerNotCached, match="call ensure"):
        cache.overlay_lowerdirs([base, missing])
    with pytest.raises(InvalidInput, match="at least one layer"):
        cache.overlay_lowerdirs([])


def test_overlay_refuses_a_root_overlayfs_cannot_parse(tmp_path: Path, blobs: Path) -> None:
    cache = LayerCache(tmp_path / "ca:che")
    digest, blob = make_layer(blobs, {"a": b"a"})
    cache.ensure(digest, blob, TAR_GZ)
    with pytest.raises(InvalidInput, match="overlayfs"):
        cache.overlay_lowerdirs([digest])


def test_refused_layer_leaves_nothing_and_counts_nothing(tmp_path: Path, blobs: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("../escape")
        tar.addfile(info, io.BytesIO(b""))
    blob = blobs / "evil"
    blobs.mkdir()
    blob.write_bytes(buf.getvalue())
    digest = "sha256:" + hashlib.sha256(buf.getvalue()).hexdigest()
    cache = LayerCache(tmp_path / "cache")
    with pytest.raises(UnsafeLayerMember, match=r"'\.\.'"):
        cache.ensure(digest, blob, "application/vnd.oci.image.layer.v1.tar")
    assert os.listdir(tmp_path / "cache" / "layers") == []
    assert not (tmp_path / "escape").exists()
    assert cache.snapshot()["misses"] == 0


def test_blob_that_does_not_match_its_digest(tmp_path: Path, blobs: Path) -> None:
    _, blob = make_layer(blobs, {"a": b"a"})
    wrong = "sha256:" + "cd" * 32
    cache = LayerCache(tmp_path / "cache")
    with pytest.raises(LayerDigestMismatch):
        cache.ensure(wrong, blob, TAR_GZ)
    assert not cache.has(wrong)
    trusting = LayerCache(tmp_path / "cache", verify_digests=False)
    assert trusting.ensure(wrong, blob, TAR_GZ).is_dir()


@pytest.mark.parametrize("digest", ["sha256:XYZ", "md5:" + "0" * 32, "sha256:" + "A" * 64, ""])
def test_malformed_digest(tmp_path: Path, digest: str) -> None:
    cache = LayerCache(tmp_path / "cache")
    with pytest.raises(InvalidInput, match="malformed"):
        cache.ensure(digest, tmp_path / "nothing", TAR_GZ)
    with pytest.raises(InvalidInput, match="malformed"):
        cache.acquire("inst", [digest])


def test_recovers_from_a_process_that_died_mid_unpack(tmp_path: Path, blobs: Path) -> None:
    digest, blob = make_layer(blobs, {"a": b"a"})
    hexpart = digest.partition(":")[2]
    cache = LayerCache(tmp_path / "cache")
    stale = tmp_path / "cache" / "layers" / f".{hexpart}.unpack-dead"
    (stale / "half").mkdir(parents=True)
    cache.ensure(digest, blob, TAR_GZ)
    assert not stale.exists()


def test_adopts_a_layer_renamed_but_not_recorded(tmp_path: Path, blobs: Path) -> None:
    digest, blob = make_layer(blobs, {"a": b"a"})
    cache = LayerCache(tmp_path / "cache")
    cache.ensure(digest, blob, TAR_GZ)
    (tmp_path / "cache" / "state.json").write_text("{ torn")  # damaged state file
    fresh = LayerCache(tmp_path / "cache")
    assert fresh.snapshot()["cached_layers"] == [digest]
    fresh.ensure(digest, blob, TAR_GZ)
    assert fresh.snapshot()["hits"] == 1
