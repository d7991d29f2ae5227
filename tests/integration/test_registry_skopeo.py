"""Interoperability: skopeo pushes to and pulls from fleetvisor's registry, byte for byte.

Needs the `skopeo` binary (Debian package `skopeo`); skipped with the reason otherwise.
skopeo's state (blob-info cache, auth file, temp files) is kept under tmp_path.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI

from fleetvisor.images.archive import import_image
from fleetvisor.images.registry_server import registry_router, token_authorizer
from fleetvisor.images.store import ImageStore
from helpers import serving

ADMIN = "skopeo-admin-token"
PULLER = "skopeo-host-token"
SKOPEO = shutil.which("skopeo")

pytestmark = pytest.mark.skipif(
    SKOPEO is None, reason="skopeo is not installed (apt-get install skopeo)"
)


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write_layout(root: Path, tag: str) -> list[bytes]:
    """An OCI layout holding one image (`tag`): two gzip layers and a config.

    Gzip, because skopeo compresses plain layers on their way to a registry; compressed
    layers pass untouched, so the round trip can be compared byte for byte.
    """
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    tars = []
    for name, content in [("etc/hostname", b"fleet\n"), ("data/big", os.urandom(2 << 20))]:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        tars.append(buffer.getvalue())
    layers = [gzip.compress(t, compresslevel=1, mtime=0) for t in tars]
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": [sha(t) for t in tars]},
        }
    ).encode()
    kinds = ["application/vnd.oci.image.layer.v1.tar+gzip"] * 2
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": sha(config),
                "size": len(config),
            },
            "layers": [
                {"mediaType": kind, "digest": sha(data), "size": len(data)}
                for kind, data in zip(kinds, layers, strict=True)
            ],
        },
        separators=(",", ":"),
    ).encode()
    for data in (config, *layers, manifest):
        (blobs / sha(data).split(":")[1]).write_bytes(data)
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": sha(manifest),
                "size": len(manifest),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (root / "index.json").write_text(json.dumps(index))
    return [manifest, config, *layers]


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[tuple[str, ImageStore]]:
    """The registry router in a FastAPI app, served by uvicorn on 127.0.0.1 in a thread."""
    store = ImageStore(tmp_path / "registry")
    app = FastAPI()
    app.include_router(
        registry_router(lambda _request: store, token_authorizer(ADMIN, lambda t: t == PULLER))
    )
    with serving(app) as url:
        yield url.removeprefix("http://"), store


def skopeo(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run skopeo with every file it writes kept under tmp_path."""
    home = tmp_path / "skopeo-home"
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "TMPDIR": str(home / "tmp"),
        "XDG_DATA_HOME": str(home / "data"),
        "XDG_RUNTIME_DIR": str(home / "run"),
        "REGISTRY_AUTH_FILE": str(home / "auth.json"),
        # As root, containers/image puts its blob-info cache in /var/lib/containers; this
        # (its own rootless marker) sends it to XDG_DATA_HOME instead, inside tmp_path.
        "_CONTAINERS_ROOTLESS_UID": "1000",
    }
    command = [str(SKOPEO), "--insecure-policy", "--command-timeout", "120s", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)


def test_skopeo_push_and_pull_round_trip(registry: tuple[str, ImageStore], tmp_path: Path) -> None:
    """skopeo copies oci: -> our registry -> oci:, and every blob arrives byte-identical."""
    address, store = registry
    source = tmp_path / "src"
    originals = write_layout(source, "v1")

    push = skopeo(
        tmp_path,
        "copy",
        "--dest-tls-verify=false",
        "--dest-creds",
        f"x:{ADMIN}",
        "oci:" + str(source) + ":v1",
        f"docker://{address}/fleet/tiny:v1",
    )
    assert push.returncode == 0, push.stderr
    assert store.tags("fleet/tiny") == ["v1"]
    assert store.raw_manifest("fleet/tiny:v1").data == originals[0]
    for blob in originals[1:]:
        assert store.blob_path(sha(blob)).read_bytes() == blob

    tags = skopeo(
        tmp_path, "list-tags", "--tls-verify=false", "--creds", f"x:{PULLER}",
        f"docker://{address}/fleet/tiny",
    )  # fmt: skip
    assert tags.returncode == 0, tags.stderr
    assert json.loads(tags.stdout)["Tags"] == ["v1"]

    dest = tmp_path / "dst"
    pull = skopeo(
        tmp_path,
        "copy",
        "--src-tls-verify=false",
        "--src-creds",
        f"x:{PULLER}",
        f"docker://{address}/fleet/tiny:v1",
        "oci:" + str(dest) + ":v1",
    )
    assert pull.returncode == 0, pull.stderr
    for blob in originals:
        copied = dest / "blobs" / "sha256" / sha(blob).split(":")[1]
        assert copied.read_bytes() == blob

    imported = import_image(ImageStore(tmp_path / "imported"), dest, "fleet/tiny")
    assert (imported.tag, imported.digest, imported.layers) == ("v1", sha(originals[0]), 2)


def test_skopeo_is_refused_without_the_right_token(
    registry: tuple[str, ImageStore], tmp_path: Path
) -> None:
    """No credentials: 401; a host (pull-only) token cannot push; nothing gets stored."""
    address, store = registry
    source = tmp_path / "src"
    write_layout(source, "v1")
    target = f"docker://{address}/fleet/denied:v1"
    anonymous = skopeo(tmp_path, "copy", "--dest-tls-verify=false", f"oci:{source}:v1", target)
    assert anonymous.returncode != 0
    assert "401" in anonymous.stderr or "unauthorized" in anonymous.stderr.lower()
    host = skopeo(
        tmp_path, "copy", "--dest-tls-verify=false", "--dest-creds", f"x:{PULLER}",
        f"oci:{source}:v1", target,
    )  # fmt: skip
    assert host.returncode != 0
    assert "denied" in host.stderr.lower() or "403" in host.stderr
    assert store.images() == []
