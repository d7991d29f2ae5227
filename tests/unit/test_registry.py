"""The registry router served by uvicorn on 127.0.0.1, driven by RegistryClient and raw HTTP."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from fleetvisor.errors import Forbidden, NotFound, Unauthorized
from fleetvisor.images.registry_client import RegistryClient
from fleetvisor.images.registry_server import registry_router, token_authorizer
from fleetvisor.images.store import (
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    ImageStore,
)
from helpers import serving

ADMIN = "admin-token-for-tests"
PULLER = "host-token-for-tests"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def add_image(store: ImageStore, ref: str | None, name: str, seed: str, arch: str = "amd64") -> str:
    """A two-layer image in `store` tagged `name:ref` (untagged when ref is None)."""
    layers = []
    for i, size in enumerate((100, 300_000)):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            content = (seed * size).encode()[:size]
            info = tarfile.TarInfo(f"layer{i}/{seed}")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        layers.append(store.put_blob(buffer.getvalue(), media_type=OCI_LAYER))
    config = json.dumps(
        {"architecture": arch, "os": "linux", "rootfs": {"diff_ids": [d.digest for d in layers]}}
    ).encode()
    config_desc = store.put_blob(config, media_type=OCI_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config_desc.to_json(),
        "layers": [d.to_json() for d in layers],
    }
    return store.put_manifest(name, ref, json.dumps(manifest).encode(), OCI_MANIFEST)


@dataclass
class Registry:
    url: str
    store: ImageStore

    def http(self, token: str | None = ADMIN) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    store = ImageStore(tmp_path / "registry")
    app = FastAPI()
    app.include_router(
        registry_router(lambda _request: store, token_authorizer(ADMIN, lambda t: t == PULLER))
    )
    with serving(app) as url:
        yield Registry(url, store)


def errors_code(response: httpx.Response) -> str:
    code: str = response.json()["errors"][0]["code"]
    return code


def test_push_then_pull_round_trip(registry: Registry, tmp_path: Path) -> None:
    """Push uploads what is missing, pull fetches what is missing; blobs arrive byte-exact."""
    source = ImageStore(tmp_path / "source")
    digest = add_image(source, "v1", "fleet/app", "a")
    with RegistryClient(registry.url, ADMIN) as client:
        pushed = client.push(source, "fleet/app:v1")
        assert (pushed.digest, pushed.blobs_transferred, pushed.blobs_skipped) == (digest, 3, 0)
        again = client.push(source, "fleet/app:v1", remote_ref="fleet/app:copy")
        assert (again.blobs_transferred, again.bytes_transferred, again.blobs_skipped) == (0, 0, 3)
        assert client.tags("fleet/app") == ["copy", "v1"]
    assert registry.store.resolve("fleet/app:v1") == digest

    target = ImageStore(tmp_path / "target")
    seen: list[int] = []
    with RegistryClient(registry.url, PULLER) as client:
        pulled = client.pull("fleet/app:v1", target, progress=seen.append)
        assert pulled.digest == digest and pulled.blobs_transferred == 3
        assert pulled.bytes_transferred == sum(seen) > 300_000
        second = client.pull(f"fleet/app@{digest}", target, local_ref="mirror/app:v1")
        assert (second.bytes_transferred, second.blobs_skipped) == (0, 3)
    for blob in source.manifest("fleet/app:v1").blobs:
        assert (
            target.blob_path(blob.digest).read_bytes() == source.blob_path(blob.digest).read_bytes()
        )
    assert target.resolve("mirror/app:v1") == digest


def test_pull_follows_an_index_to_linux_amd64(registry: Registry, tmp_path: Path) -> None:
    """A pushed image index (children by digest) pulls as its linux/amd64 image."""
    source = ImageStore(tmp_path / "source")
    children = [
        {
            "mediaType": OCI_MANIFEST,
            "digest": (d := add_image(source, None, "multi", seed, arch)),
            "size": source.blob_size(d),
            "platform": {"os": "linux", "architecture": arch},
        }
        for seed, arch in [("r", "arm64"), ("x", "amd64")]
    ]
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": children})
    source.put_manifest("multi", "v1", index.encode(), OCI_INDEX)
    target = ImageStore(tmp_path / "target")
    with RegistryClient(registry.url, ADMIN) as client:
        client.push(source, "multi:v1")
        pulled = client.pull("multi:v1", target)
    assert pulled.digest == children[1]["digest"] == target.resolve("multi:v1")


def test_tokens_basic_auth_and_refusals(registry: Registry, tmp_path: Path) -> None:
    """No or wrong token: 401 with a Basic challenge; pull tokens may not push (403)."""
    digest = add_image(registry.store, "v1", "app", "q")
    blob = registry.store.manifest("app:v1").layers[0].digest
    paths = [
        ("GET", "/v2/"),
        ("GET", "/v2/app/manifests/v1"),
        ("HEAD", f"/v2/app/manifests/{digest}"),
        ("GET", f"/v2/app/blobs/{blob}"),
        ("GET", "/v2/app/tags/list"),
        ("POST", "/v2/app/blobs/uploads/"),
        ("PUT", "/v2/app/manifests/v2"),
        ("DELETE", "/v2/app/manifests/v1"),
        ("GET", "/v2/no/such/endpoint"),
    ]
    for token in (None, "wrong"):
        with registry.http(token) as http:
            for method, path in paths:
                answer = http.request(method, path)
                assert answer.status_code == 401, (method, path)
                assert answer.headers["www-authenticate"].startswith("Basic realm=")
                if method != "HEAD":
                    assert errors_code(answer) == "UNAUTHORIZED"
    basic = base64.b64encode(f"anyuser:{ADMIN}".encode()).decode()
    with httpx.Client(base_url=registry.url, headers={"Authorization": f"Basic {basic}"}) as http:
        assert http.get("/v2/").status_code == 200
        assert http.get("/v2/app/manifests/v1").status_code == 200
    with registry.http(PULLER) as http:
        assert http.get(f"/v2/app/blobs/{blob}").status_code == 200
        for method, path in paths[5:8]:
            answer = http.request(method, path)
            assert (answer.status_code, errors_code(answer)) == (403, "DENIED"), path
    source = ImageStore(tmp_path / "source")
    add_image(source, "v1", "mine", "m")
    with RegistryClient(registry.url, "wrong") as client, pytest.raises(Unauthorized):
        client.pull("app:v1", source)
    with RegistryClient(registry.url, PULLER) as client, pytest.raises(Forbidden):
        client.push(source, "mine:v1")
    with RegistryClient(registry.url, ADMIN) as client, pytest.raises(NotFound):
        client.pull("app:absent", source)


def test_bad_requests_get_spec_error_bodies(registry: Registry) -> None:
    """Malformed or unknown input answers 4xx with the distribution spec's error codes."""
    add_image(registry.store, "v1", "app", "e")
    absent = "sha256:" + "0" * 64
    layer = {"mediaType": OCI_LAYER, "digest": absent, "size": 1}
    orphan = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": layer, "layers": []}
    oci = {"Content-Type": OCI_MANIFEST}
    cases = [
        ("GET", "/v2/app/manifests/nope", {}, 404, "MANIFEST_UNKNOWN"),
        ("GET", f"/v2/app/manifests/{absent}", {}, 404, "MANIFEST_UNKNOWN"),
        ("GET", "/v2/app/manifests/sha256:short", {}, 400, "DIGEST_INVALID"),
        ("GET", "/v2/app/manifests/bad!tag", {}, 400, "MANIFEST_INVALID"),
        ("GET", "/v2/Bad/manifests/v1", {}, 400, "NAME_INVALID"),
        ("GET", f"/v2/app/blobs/{absent}", {}, 404, "BLOB_UNKNOWN"),
        ("GET", "/v2/app/blobs/md5:abc", {}, 400, "DIGEST_INVALID"),
        ("GET", "/v2/nothing/tags/list", {}, 404, "NAME_UNKNOWN"),
        ("GET", "/v2/app/tags/list?n=x", {}, 400, "PAGINATION_NUMBER_INVALID"),
        ("PUT", "/v2/app/manifests/v2", {"content": b"{", "headers": oci}, 400, "MANIFEST_INVALID"),
        ("PUT", "/v2/app/manifests/v2", {"json": orphan}, 400, "MANIFEST_BLOB_UNKNOWN"),
        ("PUT", f"/v2/app/manifests/{absent}", {"json": orphan}, 400, "DIGEST_INVALID"),
        ("PUT", "/v2/app/manifests/big", {"content": b" " * (5 << 20)}, 413, "SIZE_INVALID"),
        ("POST", "/v2/app/blobs/uploads/?digest=nope", {}, 400, "DIGEST_INVALID"),
        ("PATCH", "/v2/app/blobs/uploads/not-an-id", {}, 404, "BLOB_UPLOAD_UNKNOWN"),
        ("PATCH", "/v2/app/blobs/uploads/" + "f" * 32, {}, 404, "BLOB_UPLOAD_UNKNOWN"),
        ("DELETE", f"/v2/app/blobs/{absent}", {}, 405, "UNSUPPORTED"),
        ("POST", "/v2/app/manifests/v1", {}, 405, "UNSUPPORTED"),
        ("GET", "/v2/app/unknown", {}, 404, "NAME_UNKNOWN"),
        ("DELETE", "/v2/app/manifests/nope", {}, 404, "MANIFEST_UNKNOWN"),
    ]
    with registry.http() as http:
        for method, path, kwargs, status, code in cases:
            answer = http.request(method, path, **kwargs)  # type: ignore[arg-type]
            assert (answer.status_code, errors_code(answer)) == (status, code), (method, path)
            assert answer.headers["docker-distribution-api-version"] == "registry/2.0"
    assert registry.store.tags("app") == ["v1"]


def test_chunked_upload_keeps_state_on_disk(registry: Registry) -> None:
    """POST, PATCH chunks (Content-Range), status, PUT ?digest=; a wrong digest stores nothing."""
    data = bytes(range(256)) * 1000
    with registry.http() as http:
        started = http.post("/v2/deep/name/space/blobs/uploads/")
        assert started.status_code == 202
        location = started.headers["location"]
        upload_file = registry.store.uploads_dir / started.headers["docker-upload-uuid"]
        first = http.patch(location, content=data[:1000], headers={"Content-Range": "0-999"})
        assert (first.status_code, first.headers["range"]) == (202, "0-999")
        assert upload_file.stat().st_size == 1000
        status = http.get(location)
        assert (status.status_code, status.headers["range"]) == (204, "0-999")
        wrong = http.patch(location, content=b"x", headers={"Content-Range": "5-5"})
        assert (wrong.status_code, errors_code(wrong)) == (416, "BLOB_UPLOAD_INVALID")
        second = http.patch(first.headers["location"], content=data[1000:])
        assert second.headers["range"] == f"0-{len(data) - 1}"
        done = http.put(second.headers["location"], params={"digest": sha(data)})
        assert (done.status_code, done.headers["docker-content-digest"]) == (201, sha(data))
        assert not upload_file.exists()
        head = http.head(f"/v2/deep/name/space/blobs/{sha(data)}")
        assert (head.status_code, head.headers["content-length"]) == (200, str(len(data)))
        assert http.get(done.headers["location"]).content == data

        bad = http.post("/v2/app/blobs/uploads/", params={"digest": sha(b"other")}, content=b"x")
        assert (bad.status_code, errors_code(bad)) == (400, "DIGEST_INVALID")
        assert not registry.store.has_blob(sha(b"x")) and not registry.store.has_blob(sha(b"other"))
        mono = http.post("/v2/app/blobs/uploads/", params={"digest": sha(b"x")}, content=b"x")
        assert mono.status_code == 201 and registry.store.has_blob(sha(b"x"))
        mount = http.post("/v2/app/blobs/uploads/", params={"mount": sha(b"x"), "from": "other"})
        assert mount.status_code == 201
        cancelled = http.post("/v2/app/blobs/uploads/")
        assert http.delete(cancelled.headers["location"]).status_code == 204
        assert http.get(cancelled.headers["location"]).status_code == 404
    assert list(registry.store.uploads_dir.iterdir()) == []


def test_manifest_heads_tags_pagination_and_delete(registry: Registry) -> None:
    """HEAD gives digest and length; tags paginate with Link; DELETE untags."""
    digest = add_image(registry.store, "a", "app", "t")
    for tag in ("b", "c"):
        registry.store.put_manifest("app", tag, registry.store.raw_manifest("app:a").data)
    with registry.http() as http:
        head = http.head("/v2/app/manifests/a")
        assert head.headers["docker-content-digest"] == digest
        assert head.headers["content-type"] == OCI_MANIFEST
        assert int(head.headers["content-length"]) == registry.store.blob_size(digest)
        page = http.get("/v2/app/tags/list", params={"n": 2})
        assert page.json() == {"name": "app", "tags": ["a", "b"]}
        assert 'rel="next"' in page.headers["link"]
        rest = http.get("/v2/app/tags/list", params={"n": 2, "last": "b"})
        assert rest.json()["tags"] == ["c"] and "link" not in rest.headers
        assert http.delete("/v2/app/manifests/b").status_code == 202
        assert http.get("/v2/app/manifests/b").status_code == 404
        assert http.delete(f"/v2/app/manifests/{digest}").status_code == 202
        assert http.get("/v2/app/manifests/a").status_code == 404


def test_layer_media_types_survive_the_round_trip(registry: Registry, tmp_path: Path) -> None:
    """A gzip layer keeps its media type and bytes through push and pull."""
    import gzip

    source = ImageStore(tmp_path / "source")
    layer = source.put_blob(gzip.compress(b"\0" * 4096), media_type=OCI_LAYER_GZIP)
    config = source.put_blob(b"{}", media_type=OCI_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.to_json(),
        "layers": [layer.to_json()],
    }
    source.put_manifest("gz", "v1", json.dumps(manifest).encode())
    target = ImageStore(tmp_path / "target")
    with RegistryClient(registry.url, ADMIN) as client:
        client.push(source, "gz:v1")
        client.pull("gz:v1", target)
    assert target.manifest("gz:v1").layers[0].media_type == OCI_LAYER_GZIP
    assert target.raw_manifest("gz:v1").data == source.raw_manifest("gz:v1").data


def test_blobs_stream_through_push_and_pull(registry: Registry, tmp_path: Path) -> None:
    """A 32 MiB layer goes up and comes back without being held in memory anywhere."""
    import os
    import tracemalloc

    source = ImageStore(tmp_path / "source")
    layer = source.put_blob(iter(os.urandom(1 << 20) for _ in range(32)), media_type=OCI_LAYER)
    config = source.put_blob(b"{}", media_type=OCI_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.to_json(),
        "layers": [layer.to_json()],
    }
    source.put_manifest("big", "v1", json.dumps(manifest).encode())
    target = ImageStore(tmp_path / "target")
    tracemalloc.start()
    try:
        with RegistryClient(registry.url, ADMIN) as client:
            client.push(source, "big:v1")
            pulled = client.pull("big:v1", target)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert pulled.bytes_transferred == layer.size + config.size
    assert (
        target.blob_path(layer.digest).read_bytes() == source.blob_path(layer.digest).read_bytes()
    )
    assert peak < 12 << 20, f"push+pull held {peak} bytes at once"
