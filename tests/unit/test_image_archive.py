"""Importing images: OCI layout directories, OCI archives and `docker save` tars, verified."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from fleetvisor.errors import InvalidInput, NotFound
from fleetvisor.images.archive import import_image
from fleetvisor.images.store import (
    OCI_CONFIG,
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    REF_NAME,
    ImageStore,
)


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_tar(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, content in sorted(files.items()):
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(content), 0o644, 1_700_000_000
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def config_for(layers: list[bytes]) -> bytes:
    diff_ids = [sha(gzip.decompress(x) if x[:2] == b"\x1f\x8b" else x) for x in layers]
    return json.dumps(
        {
            "created": "2024-05-06T07:08:09Z",
            "architecture": "amd64",
            "os": "linux",
            "config": {"Entrypoint": ["/bin/app"], "Env": ["A=1"], "User": "1000"},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
    ).encode()


def write_oci_layout(root: Path, ref_names: list[str]) -> dict[str, list[bytes]]:
    """A hand-made OCI layout (as skopeo writes one): one image per ref name, 2 layers each."""
    (root / "blobs" / "sha256").mkdir(parents=True)
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    entries, contents = [], {}

    def blob(data: bytes) -> str:
        (root / "blobs" / "sha256" / sha(data).split(":")[1]).write_bytes(data)
        return sha(data)

    for ref in ref_names:
        layers = [
            layer_tar({"etc/ref": ref.encode()}),
            gzip.compress(layer_tar({"big": b"z" * 5000})),
        ]
        config = config_for(layers)
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": blob(config), "size": len(config)},
                "layers": [
                    {"mediaType": kind, "digest": blob(data), "size": len(data)}
                    for kind, data in zip([OCI_LAYER, OCI_LAYER_GZIP], layers, strict=True)
                ],
            }
        ).encode()
        entries.append(
            {
                "mediaType": OCI_MANIFEST,
                "digest": blob(manifest),
                "size": len(manifest),
                "annotations": {REF_NAME: ref},
            }
        )
        contents[ref] = [config, *layers]
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": entries}))
    return contents


def tar_directory(source: Path, archive: Path) -> None:
    with tarfile.open(archive, "w") as tar:
        for path in sorted(source.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(source)), recursive=False)


def write_docker_save(archive: Path) -> list[bytes]:
    """A `docker save` tar: legacy `<id>/layer.tar` layers plus one gzip blob-path layer."""
    plain = layer_tar({"bin/app": b"#!/bin/sh\necho hi\n"})
    zipped = gzip.compress(layer_tar({"etc/motd": b"hello"}))
    config = config_for([plain, zipped])
    config_name = sha(config).split(":")[1] + ".json"
    zipped_name = "blobs/sha256/" + sha(zipped).split(":")[1]
    manifest = [
        {"Config": config_name, "RepoTags": ["tiny:v3"], "Layers": ["aaa/layer.tar", zipped_name]}
    ]
    with tarfile.open(archive, "w") as tar:
        for name, data in [
            ("manifest.json", json.dumps(manifest).encode()),
            (config_name, config),
            ("aaa/VERSION", b"1.0"),
            ("aaa/layer.tar", plain),
            (zipped_name, zipped),
            ("repositories", b'{"tiny": {"v3": "aaa"}}'),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return [config, plain, zipped]


def flip_byte_in(archive: Path, member_suffix: str, skip: int = 600) -> None:
    """Flip one byte inside the data of the first tar member whose name ends with the suffix."""
    with tarfile.open(archive) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(member_suffix))
    data = bytearray(archive.read_bytes())
    data[member.offset_data + min(skip, member.size - 1)] ^= 0x01
    archive.write_bytes(bytes(data))


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "store")


def assert_stored(store: ImageStore, ref: str, blobs: list[bytes]) -> None:
    manifest = store.manifest(ref)
    stored = [store.blob_path(d.digest).read_bytes() for d in manifest.blobs]
    assert stored == blobs


def test_import_oci_layout_directory_keeps_its_tag(store: ImageStore, tmp_path: Path) -> None:
    """A layout's `ref.name` tag is kept when the import name has none."""
    contents = write_oci_layout(tmp_path / "layout", ["v1"])
    info = import_image(store, tmp_path / "layout", "fleet/tiny")
    assert (info.name, info.tag, info.layers) == ("fleet/tiny", "v1", 2)
    assert info.created == "2024-05-06T07:08:09Z"
    assert_stored(store, "fleet/tiny:v1", contents["v1"])
    assert store.image_config("fleet/tiny:v1")["Entrypoint"] == ["/bin/app"]


def test_import_oci_archive_selects_among_images(store: ImageStore, tmp_path: Path) -> None:
    """An OCI archive with several images needs a selection; the import name's tag wins."""
    contents = write_oci_layout(tmp_path / "layout", ["one", "two"])
    archive = tmp_path / "images.tar"
    tar_directory(tmp_path / "layout", archive)
    with pytest.raises(InvalidInput, match="select one"):
        import_image(store, archive, "multi")
    with pytest.raises(NotFound, match="three"):
        import_image(store, archive, "multi", select="three")
    info = import_image(store, archive, "multi:chosen", select="two")
    assert info.ref == "multi:chosen"
    assert_stored(store, "multi:chosen", contents["two"])


def test_import_docker_save_builds_an_oci_manifest(store: ImageStore, tmp_path: Path) -> None:
    """`docker save` layers are stored as-is, typed by magic, under a built OCI manifest."""
    archive = tmp_path / "docker.tar"
    config, plain, zipped = write_docker_save(archive)
    info = import_image(store, archive, "imported")
    assert info.ref == "imported:v3"  # the RepoTags tag
    manifest = store.manifest("imported:v3")
    assert manifest.media_type == OCI_MANIFEST
    assert [d.media_type for d in manifest.layers] == [OCI_LAYER, OCI_LAYER_GZIP]
    assert manifest.config.media_type == OCI_CONFIG
    assert_stored(store, "imported:v3", [config, plain, zipped])
    assert store.image_config("imported:v3")["User"] == "1000"


@pytest.mark.parametrize("form", ["layout-dir", "oci-archive", "docker-save"])
def test_tampered_archive_is_refused_and_nothing_indexed(
    store: ImageStore, tmp_path: Path, form: str
) -> None:
    """One flipped byte in a layer fails the digest check; the store's index is untouched."""
    before_index = store.index_path.read_bytes()
    if form == "docker-save":
        source = tmp_path / "docker.tar"
        write_docker_save(source)
        flip_byte_in(source, "layer.tar")
    else:
        contents = write_oci_layout(tmp_path / "layout", ["v1"])
        layer_file = tmp_path / "layout" / "blobs" / "sha256" / sha(contents["v1"][1]).split(":")[1]
        source = tmp_path / "layout"
        if form == "oci-archive":
            source = tmp_path / "oci.tar"
            tar_directory(tmp_path / "layout", source)
            flip_byte_in(source, layer_file.name)
        else:
            data = bytearray(layer_file.read_bytes())
            data[len(data) // 2] ^= 0x01
            layer_file.write_bytes(bytes(data))
    with pytest.raises(InvalidInput, match="tampered|corrupt"):
        import_image(store, source, "evil:v1")
    assert store.index_path.read_bytes() == before_index
    assert store.images() == []


def test_truncated_and_foreign_files_are_refused(store: ImageStore, tmp_path: Path) -> None:
    """A cut-off archive, a non-archive and a missing path are clear user errors."""
    write_oci_layout(tmp_path / "layout", ["v1"])
    archive = tmp_path / "oci.tar"
    tar_directory(tmp_path / "layout", archive)
    data = archive.read_bytes()
    for cut in (len(data) // 2, 700):
        truncated = tmp_path / f"cut-{cut}.tar"
        truncated.write_bytes(data[:cut])
        with pytest.raises(InvalidInput, match="truncated|incomplete"):
            import_image(store, truncated, "cut")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00not a tar at all" * 100)
    with pytest.raises(InvalidInput, match="not a readable image archive"):
        import_image(store, junk, "junk")
    with pytest.raises(NotFound, match="does not exist"):
        import_image(store, tmp_path / "absent.tar", "absent")
    with pytest.raises(InvalidInput, match="lowercase"):
        import_image(store, archive, "Bad Name")
    assert store.images() == []


def test_import_streams_large_layers(store: ImageStore, tmp_path: Path) -> None:
    """A 48 MiB layer is imported without ever being held in memory."""
    import tracemalloc

    layout = tmp_path / "layout"
    write_oci_layout(layout, ["v1"])
    index = json.loads((layout / "index.json").read_text())
    blobs = layout / "blobs" / "sha256"
    manifest = json.loads((blobs / index["manifests"][0]["digest"].split(":")[1]).read_bytes())
    big, hasher = blobs / "big.tmp", hashlib.sha256()
    with big.open("wb") as out:
        for _ in range(48):
            chunk = os.urandom(1 << 20)
            hasher.update(chunk)
            out.write(chunk)
    big_digest = "sha256:" + hasher.hexdigest()
    big.rename(blobs / hasher.hexdigest())
    manifest["layers"].append({"mediaType": OCI_LAYER, "digest": big_digest, "size": 48 << 20})
    data = json.dumps(manifest).encode()
    (blobs / sha(data).split(":")[1]).write_bytes(data)
    index["manifests"][0].update(digest=sha(data), size=len(data))
    (layout / "index.json").write_text(json.dumps(index))
    archive = tmp_path / "big.tar"
    tar_directory(layout, archive)

    tracemalloc.start()
    try:
        info = import_image(store, archive, "big")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.layers == 3 and store.blob_size(big_digest) == 48 << 20
    assert peak < 8 << 20, f"import held {peak} bytes at once"
