"""The OCI image store: digests, blobs, manifests, refs, listing, removal, gc, concurrency."""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import tarfile
from collections.abc import Callable
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path

import pytest

from fleetvisor.errors import InvalidInput, NotFound
from fleetvisor.images.digest import (
    DigestMismatch,
    digest_bytes,
    digest_file,
    uncompressed_digest,
    validate_digest,
)
from fleetvisor.images.store import (
    DOCKER_CONFIG,
    DOCKER_MANIFEST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    OCI_MANIFEST,
    REF_NAME,
    ImageStore,
    MissingBlobs,
    Reference,
)


def layer_tar(files: dict[str, bytes]) -> bytes:
    """An uncompressed layer tar holding `files` (path -> content)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, content in sorted(files.items()):
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(content), 0o644, 1_700_000_000
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def add_image(
    store: ImageStore,
    name: str,
    tag: str | None,
    files: dict[str, bytes],
    *,
    arch: str = "amd64",
    manifest_type: str = OCI_MANIFEST,
) -> tuple[str, bytes, bytes]:
    """Store a one-layer image; answers (manifest digest, layer bytes, config bytes)."""
    layer = layer_tar(files)
    layer_desc = store.put_blob(layer, media_type=OCI_LAYER)
    config = json.dumps(
        {
            "created": "2024-01-02T03:04:05Z",
            "architecture": arch,
            "os": "linux",
            "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"], "WorkingDir": "/"},
            "rootfs": {"type": "layers", "diff_ids": [layer_desc.digest]},
        }
    ).encode()
    config_type = DOCKER_CONFIG if manifest_type == DOCKER_MANIFEST else OCI_CONFIG
    config_desc = store.put_blob(config, media_type=config_type)
    manifest = {
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": config_desc.to_json(),
        "layers": [layer_desc.to_json()],
    }
    digest = store.put_manifest(name, tag, json.dumps(manifest).encode(), manifest_type)
    return digest, layer, config


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "store")


def test_digest_validation_says_the_expected_form() -> None:
    """Digests must be sha256:<64 lowercase hex>; the error shows that form."""
    good = "sha256:" + "a" * 64
    assert validate_digest(good) == good
    for bad in ["sha256:" + "A" * 64, "sha256:abc", "sha512:" + "a" * 128, "a" * 64, ""]:
        with pytest.raises(InvalidInput, match=r"sha256:<64 lowercase hex digits>"):
            validate_digest(bad)


def test_digest_of_files_and_gzip_diff_id(tmp_path: Path) -> None:
    """Files hash in chunks; the diff_id of a gzip layer is the digest of its tar."""
    import gzip

    tar = layer_tar({"a": b"x" * 3_000_000})
    plain, zipped = tmp_path / "plain", tmp_path / "zipped"
    plain.write_bytes(tar)
    zipped.write_bytes(gzip.compress(tar))
    assert digest_file(plain) == (digest_bytes(tar), len(tar))
    assert uncompressed_digest(zipped) == uncompressed_digest(plain) == digest_bytes(tar)


def test_put_blob_verifies_and_leaves_no_debris(store: ImageStore) -> None:
    """Blobs from bytes, streams and chunk iterators; a mismatch stores nothing."""
    data = os.urandom(3 << 20)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert store.put_blob(data).digest == digest
    assert store.put_blob(io.BytesIO(data), digest).size == len(data)
    assert store.put_blob(iter([data[:10], data[10:]]), digest, expected_size=len(data))
    assert store.has_blob(digest) and store.blob_size(digest) == len(data)
    with store.open_blob(digest) as stream:
        assert stream.read() == data
    assert store.blob_path(digest).read_bytes() == data

    other = b"not what was promised"
    wrong = "sha256:" + "0" * 64
    with pytest.raises(DigestMismatch, match="expected"):
        store.put_blob(other, wrong)
    with pytest.raises(DigestMismatch, match="declared"):
        store.put_blob(other, expected_size=5)
    assert not store.has_blob(wrong) and not store.has_blob(digest_bytes(other))
    assert sorted(p.name for p in store.blob_dir.iterdir()) == [digest.split(":")[1]]
    assert store.delete_blob(digest) and not store.delete_blob(digest)
    with pytest.raises(NotFound, match="pull or import"):
        store.open_blob(digest)


def test_manifest_round_trip(store: ImageStore) -> None:
    """put_manifest indexes name:tag; resolve, manifest, image_config and images read it back."""
    digest, layer, config = add_image(store, "fleet/tiny", "v1", {"hello": b"world"})
    assert json.loads((store.root / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads(store.index_path.read_text())
    assert index["manifests"][0]["annotations"][REF_NAME] == "fleet/tiny:v1"
    assert index["manifests"][0]["digest"] == digest

    assert store.resolve("fleet/tiny:v1") == store.resolve(f"fleet/tiny@{digest}") == digest
    manifest = store.manifest("fleet/tiny:v1")
    assert manifest.digest == digest
    assert [d.digest for d in manifest.layers] == [digest_bytes(layer)]
    assert manifest.config.digest == digest_bytes(config)
    assert store.image_config("fleet/tiny:v1")["Cmd"] == ["/bin/sh"]
    [info] = store.images()
    assert (info.name, info.tag, info.digest, info.layers) == ("fleet/tiny", "v1", digest, 1)
    assert info.size == len(layer) + len(config) + store.blob_size(digest)
    assert info.created == "2024-01-02T03:04:05Z"
    assert store.tags("fleet/tiny") == ["v1"]


def test_tag_defaults_to_latest_and_docker_manifests_are_accepted(store: ImageStore) -> None:
    """`name` means `name:latest`; Docker schema-2 manifests keep their media type."""
    digest, _, _ = add_image(store, "tiny", "latest", {"a": b"1"}, manifest_type=DOCKER_MANIFEST)
    assert store.resolve("tiny") == digest
    assert store.raw_manifest("tiny").media_type == DOCKER_MANIFEST
    assert store.image_config("tiny")["WorkingDir"] == "/"


def test_bad_refs_and_missing_images(store: ImageStore) -> None:
    """Malformed refs are InvalidInput saying what to change; absent images are NotFound."""
    for ref, advice in [
        ("Fleet/Tiny", "lowercase"),
        ("tiny:bad tag!", "latest"),
        ("tiny@sha256:abc", "sha256:<64"),
        ("a//b", "components"),
        ("", "NAME"),
    ]:
        with pytest.raises(InvalidInput, match=advice):
            Reference.parse(ref)
    with pytest.raises(NotFound, match="import"):
        store.resolve("nothing:here")
    with pytest.raises(NotFound):
        store.tags("nothing")
    assert Reference.parse("a/b:v1@sha256:" + "f" * 64).digest == "sha256:" + "f" * 64


def test_manifest_must_reference_present_blobs(store: ImageStore) -> None:
    """A manifest naming absent blobs, or bad JSON, is refused and the index is unchanged."""
    add_image(store, "tiny", "v1", {"a": b"1"})
    before = store.index_path.read_bytes()
    absent = {"mediaType": OCI_LAYER, "digest": "sha256:" + "1" * 64, "size": 3}
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": absent, "layers": []}
    with pytest.raises(MissingBlobs, match="upload them") as caught:
        store.put_manifest("tiny", "v2", json.dumps(manifest).encode(), OCI_MANIFEST)
    assert caught.value.digests == [absent["digest"]]
    for bad in [b"{not json", b"[]", b'{"schemaVersion": 1}']:
        with pytest.raises(InvalidInput):
            store.put_manifest("tiny", "v2", bad)
    with pytest.raises(InvalidInput, match="Content-Type"):
        store.put_manifest("tiny", "v2", json.dumps(manifest).encode(), DOCKER_MANIFEST)
    assert store.index_path.read_bytes() == before


def test_image_index_resolves_to_linux_amd64(store: ImageStore) -> None:
    """An image index is stored as is; manifest() follows it to the linux/amd64 image."""
    arm, _, _ = add_image(store, "multi", None, {"arch": b"arm"}, arch="arm64")
    amd, _, _ = add_image(store, "multi", None, {"arch": b"amd"}, arch="amd64")
    children = [
        {
            "mediaType": OCI_MANIFEST,
            "digest": digest,
            "size": store.blob_size(digest),
            "platform": {"os": "linux", "architecture": arch},
        }
        for digest, arch in [(arm, "arm64"), (amd, "amd64")]
    ]
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": children})
    digest = store.put_manifest("multi", "v1", index.encode(), OCI_INDEX)
    assert store.resolve("multi:v1") == digest
    assert store.manifest("multi:v1").digest == amd
    assert [i.ref for i in store.images()] == ["multi:v1"]  # untagged children not listed
    assert store.gc(min_age=0) == 0  # children are reachable through the index


def test_retag_remove_and_gc(store: ImageStore) -> None:
    """Tags move; remove untags; gc frees exactly the unreachable blobs, sparing young ones."""
    first, layer1, config1 = add_image(store, "app", "v1", {"f": b"one"})
    second, _, _ = add_image(store, "app", "v2", {"f": b"two"})
    store.put_manifest("app", "v1", store.raw_manifest("app:v2").data)  # v1 now = v2
    assert store.resolve("app:v1") == second
    with pytest.raises(NotFound):
        store.resolve(f"app@{first}")
    first_size = store.blob_size(first)
    assert store.gc() == 0  # everything is younger than the default grace period
    freed = store.gc(min_age=0)
    assert freed == len(layer1) + len(config1) + first_size
    assert not store.has_blob(first)

    store.remove("app:v1")
    assert [i.tag for i in store.images()] == ["v2"]
    with pytest.raises(NotFound):
        store.remove("app:v1")
    store.remove(f"app@{second}")
    assert store.images() == []
    assert store.gc(min_age=0) > 0
    assert [p for p in store.blob_dir.iterdir()] == []


def _write_blob(root: str, data: bytes, barrier: Barrier, results: Queue) -> None:
    store = ImageStore(Path(root))
    barrier.wait()
    results.put({store.put_blob(data).digest for _ in range(3)})


def _tag_images(root: str, worker: int, barrier: Barrier, results: Queue) -> None:
    store = ImageStore(Path(root))
    barrier.wait()
    for i in range(5):
        add_image(store, "race", f"w{worker}-{i}", {"n": f"{worker}-{i}".encode()})
    results.put({worker})


def _run_at_once(target: Callable[..., None], args: list[tuple[object, ...]]) -> list[object]:
    """Run `target(*a, barrier, queue)` in one forked process per `a`, released together."""
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(len(args)), context.Queue()
    processes = [context.Process(target=target, args=(*a, barrier, results)) for a in args]
    for process in processes:
        process.start()
    try:
        answers = [results.get(timeout=60) for _ in processes]
    finally:
        for process in processes:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
    assert all(p.exitcode == 0 for p in processes)
    return answers


def test_concurrent_writers_from_several_processes(tmp_path: Path) -> None:
    """Processes writing the same blob and tagging images at once leave one intact store."""
    root = tmp_path / "store"
    store = ImageStore(root)
    data = os.urandom(4 << 20)
    answers = _run_at_once(_write_blob, [(str(root), data)] * 6)
    assert answers == [{digest_bytes(data)}] * 6
    assert store.blob_path(digest_bytes(data)).read_bytes() == data
    assert not [p for p in store.blob_dir.iterdir() if p.name.startswith(".")]

    _run_at_once(_tag_images, [(str(root), worker) for worker in range(6)])
    assert len(store.tags("race")) == 6 * 5
