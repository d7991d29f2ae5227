"""Import one image into the store from an OCI layout directory, an OCI archive, or `docker save`.

Every blob streams from the source into the store with its digest (and size) verified on
the way; the manifest is indexed last, so a corrupt, tampered or truncated archive is
refused with nothing indexed (blobs it left behind are unreferenced: `gc` removes them).
A `docker save` image (manifest.json + layer tars + config) gets an OCI manifest built for
it; its layers are stored as they are, typed by their magic bytes, and checked against the
config's `rootfs.diff_ids`.
"""

from __future__ import annotations

import gzip
import json
import posixpath
import re
import tarfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from fleetvisor.errors import InvalidInput, NotFound
from fleetvisor.images.digest import (
    DigestMismatch,
    digest_bytes,
    is_digest,
    uncompressed_digest,
)
from fleetvisor.images.store import (
    INDEX_TYPES,
    OCI_CONFIG,
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    REF_NAME,
    TAG_PATTERN,
    Descriptor,
    ImageInfo,
    ImageStore,
    parse_manifest_document,
    pick_platform,
    referenced,
    validate_name,
    validate_tag,
)

MAX_JSON_BYTES = 16 << 20  # index.json, manifest.json, configs: metadata, never this large
_BLOB_PATH = re.compile(r"blobs/sha256/([0-9a-f]{64})")
_CONFIG_FILE = re.compile(r"([0-9a-f]{64})\.json")
_BROKEN_ARCHIVE = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)


class Source(Protocol):
    """Files of an image source by their POSIX path relative to its top."""

    label: str

    def exists(self, member: str) -> bool: ...

    def open(self, member: str) -> BinaryIO: ...


class DirectorySource:
    """An unpacked layout (or unpacked `docker save`) on disk; paths cannot leave `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.label = str(root)

    def _path(self, member: str) -> Path | None:
        path = (self.root / member).resolve()
        return path if path.is_relative_to(self.root) and path.is_file() else None

    def exists(self, member: str) -> bool:
        return self._path(member) is not None

    def open(self, member: str) -> BinaryIO:
        path = self._path(member)
        if path is None:
            raise InvalidInput(f"{self.label} lacks {member!r}; the image directory is incomplete")
        return path.open("rb")


class TarSource:
    """A tar archive (optionally gzip-compressed), read member by member without extraction."""

    def __init__(self, archive: tarfile.TarFile, label: str) -> None:
        self.archive = archive
        self.label = label
        self.members = {
            _normalize(m.name): m
            for m in archive.getmembers()
            if m.isfile() or m.issym() or m.islnk()
        }

    def exists(self, member: str) -> bool:
        return _normalize(member) in self.members

    def open(self, member: str) -> BinaryIO:
        info = self.members.get(_normalize(member))
        stream = self.archive.extractfile(info) if info is not None else None
        if stream is None:
            raise InvalidInput(f"{self.label} lacks {member!r}; the archive is incomplete")
        return stream  # type: ignore[return-value]


def import_image(
    store: ImageStore, path: Path, name: str, *, select: str | None = None
) -> ImageInfo:
    """Import one image from `path` as `name` (`NAME` or `NAME:TAG`) and answer its listing.

    Without a tag in `name`, the source's own tag is kept (else `latest`). A source with
    several images needs `select`: a ref name, a tag or a manifest digest.
    """
    base, tag = _split_name(name)
    path = Path(path)
    if not path.exists():
        raise NotFound(f"{path} does not exist; give the path of an image archive or layout")
    try:
        with _open_source(path) as source:
            if source.exists("index.json") and source.exists("oci-layout"):
                manifest, kind, source_tag = _oci_layout(store, source, select)
            elif source.exists("manifest.json"):
                manifest, kind, source_tag = _docker_save(store, source, select)
            else:
                raise InvalidInput(
                    f"{path} is neither an OCI image layout (oci-layout + index.json) nor a "
                    "`docker save` archive (manifest.json); export the image in one of those forms"
                )
            final_tag = tag or source_tag or "latest"
            digest = store.put_manifest(base, final_tag, manifest, kind)
    except _BROKEN_ARCHIVE as exc:
        raise InvalidInput(
            f"{path} is not a readable image archive, or is corrupt or truncated ({exc}); "
            "give an OCI layout directory, an OCI archive or a `docker save` tar, exported again"
        ) from exc
    info = store.info(f"{base}:{final_tag}")
    assert info.digest == digest
    return info


@contextmanager
def _open_source(path: Path) -> Iterator[Source]:
    """A directory as it is; anything else must be a tar (plain or compressed)."""
    if path.is_dir():
        yield DirectorySource(path)
        return
    with tarfile.open(path, "r:*") as archive:  # a non-tar raises ReadError: refused
        yield TarSource(archive, str(path))


def _oci_layout(
    store: ImageStore, source: Source, select: str | None
) -> tuple[bytes, str, str | None]:
    """Copy the chosen image's blobs; answer its manifest bytes, media type and source tag."""
    index = _read_json(source, "index.json")
    entries = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(entries, list) or not entries:
        raise InvalidInput(f"{source.label}: index.json lists no images; nothing to import")
    descriptors = [
        Descriptor.from_json(e, f"index.json manifests[{i}]") for i, e in enumerate(entries)
    ]
    chosen = _choose(descriptors, select, source.label)
    source_tag = _tag_of(chosen.annotations.get(REF_NAME))
    while True:
        data = _read_blob(source, chosen)
        kind, doc = parse_manifest_document(data, chosen.media_type)
        if kind not in INDEX_TYPES:
            break
        chosen = pick_platform(referenced(doc, kind))
    for blob in referenced(doc, kind):
        _copy_blob(store, source, blob)
    return data, kind, source_tag


def _docker_save(
    store: ImageStore, source: Source, select: str | None
) -> tuple[bytes, str, str | None]:
    """Store a `docker save` image's config and layers; answer an OCI manifest built for it."""
    images = _read_json(source, "manifest.json")
    if not isinstance(images, list) or not images or not all(isinstance(i, dict) for i in images):
        raise InvalidInput(f"{source.label}: manifest.json must be a non-empty list of images")
    image = _choose_docker(images, select, source.label)
    config_path, layer_paths = image.get("Config"), image.get("Layers")
    if not isinstance(config_path, str) or not isinstance(layer_paths, list):
        raise InvalidInput(f"{source.label}: manifest.json entries need 'Config' and 'Layers'")
    with source.open(config_path) as stream:
        config_bytes = _read_limited(stream, config_path)
    config_digest = digest_bytes(config_bytes)
    named = _digest_in_path(config_path)
    if named is not None and named != config_digest:
        raise DigestMismatch(
            f"{source.label}: config {config_path} hashes to {config_digest}; "
            "the archive is corrupt or tampered with: export it again"
        )
    config = _parse_json(config_bytes, config_path)
    diff_ids = (config.get("rootfs") or {}).get("diff_ids") if isinstance(config, dict) else None
    if not isinstance(diff_ids, list) or len(diff_ids) != len(layer_paths):
        raise InvalidInput(
            f"{source.label}: the config's rootfs.diff_ids must list one digest per layer "
            f"({len(layer_paths)} layers); the archive is damaged"
        )
    layers = [
        _docker_layer(store, source, str(layer), str(diff_id))
        for layer, diff_id in zip(layer_paths, diff_ids, strict=True)
    ]
    config_desc = store.put_blob(config_bytes, config_digest, media_type=OCI_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config_desc.to_json(),
        "layers": [layer.to_json() for layer in layers],
    }
    tags = image.get("RepoTags") or []
    source_tag = _tag_of(tags[0]) if tags and isinstance(tags[0], str) else None
    return json.dumps(manifest, separators=(",", ":")).encode(), OCI_MANIFEST, source_tag


def _docker_layer(store: ImageStore, source: Source, member: str, diff_id: str) -> Descriptor:
    """Store one layer tar as-is; the uncompressed content must hash to the config's diff_id."""
    if not is_digest(diff_id):
        raise InvalidInput(f"{source.label}: diff_id {diff_id[:80]!r} is not a sha256 digest")
    with source.open(member) as stream:
        magic = stream.read(4)
        stream.seek(0)
        media_type = _layer_media_type(magic)
        named = _digest_in_path(member)
        expected = diff_id if media_type == OCI_LAYER else named
        if media_type == OCI_LAYER and named is not None and named != diff_id:
            raise DigestMismatch(
                f"{source.label}: layer {member} is named {named} but its diff_id is {diff_id}"
            )
        try:
            desc = store.put_blob(stream, expected, media_type=media_type)
        except DigestMismatch as exc:
            raise DigestMismatch(f"{source.label}: layer {member}: {exc.detail}") from exc
    if (
        media_type == OCI_LAYER_GZIP
        and uncompressed_digest(store.blob_path(desc.digest)) != diff_id
    ):
        raise DigestMismatch(
            f"{source.label}: layer {member} does not unpack to its diff_id {diff_id}; "
            "the archive is corrupt or tampered with: export it again"
        )
    return desc


def _layer_media_type(magic: bytes) -> str:
    if magic.startswith(b"\x1f\x8b"):
        return OCI_LAYER_GZIP
    if magic.startswith(b"\x28\xb5\x2f\xfd"):
        return OCI_LAYER_ZSTD
    return OCI_LAYER


def _copy_blob(store: ImageStore, source: Source, blob: Descriptor) -> None:
    """Stream one blob in, verified; put_blob does not even read a blob the store has."""
    with source.open(_blob_member(blob.digest)) as stream:
        try:
            store.put_blob(stream, blob.digest, expected_size=blob.size, media_type=blob.media_type)
        except DigestMismatch as exc:
            raise DigestMismatch(f"{source.label}: {exc.detail}") from exc


def _read_blob(source: Source, desc: Descriptor) -> bytes:
    """A small blob (manifest) from the source, verified against its descriptor."""
    with source.open(_blob_member(desc.digest)) as stream:
        data = _read_limited(stream, desc.digest)
    if len(data) != desc.size or digest_bytes(data) != desc.digest:
        raise DigestMismatch(
            f"{source.label}: blob {desc.digest} does not match its descriptor; "
            "the archive is corrupt or tampered with: export it again"
        )
    return data


def _choose(descriptors: list[Descriptor], select: str | None, label: str) -> Descriptor:
    if select is None:
        if len(descriptors) == 1:
            return descriptors[0]
        refs = [d.annotations.get(REF_NAME, d.digest) for d in descriptors]
        raise InvalidInput(f"{label} holds {len(descriptors)} images ({refs}); select one of them")
    for desc in descriptors:
        ref = desc.annotations.get(REF_NAME, "")
        if select in (ref, desc.digest) or _tag_of(ref) == select:
            return desc
    raise NotFound(
        f"{label} has no image {select!r}; its refs are "
        f"{[d.annotations.get(REF_NAME, d.digest) for d in descriptors]}"
    )


def _choose_docker(images: list[dict[str, Any]], select: str | None, label: str) -> dict[str, Any]:
    if select is None:
        if len(images) == 1:
            return images[0]
        tags = [i.get("RepoTags") for i in images]
        raise InvalidInput(f"{label} holds {len(images)} images ({tags}); select one of them")
    for image in images:
        tags = [t for t in image.get("RepoTags") or [] if isinstance(t, str)]
        if select in tags or select in (_tag_of(t) for t in tags):
            return image
    raise NotFound(f"{label} has no image tagged {select!r}")


def _split_name(name: str) -> tuple[str, str | None]:
    if "@" in name:
        raise InvalidInput(f"import as NAME or NAME:TAG, not a digest reference ({name[:100]!r})")
    colon = name.rfind(":")
    if colon > name.rfind("/"):
        return validate_name(name[:colon]), validate_tag(name[colon + 1 :])
    return validate_name(name), None


def _tag_of(ref: str | None) -> str | None:
    """The tag in a ref name (`v1`, `name:v1`, `host:5000/name:v1`), if it is a valid tag."""
    if not ref:
        return None
    tail = ref.rsplit("/", 1)[-1]
    tag = tail.rsplit(":", 1)[-1]
    return tag if TAG_PATTERN.fullmatch(tag) else None


def _blob_member(digest: str) -> str:
    return f"blobs/sha256/{digest.split(':', 1)[1]}"


def _digest_in_path(member: str) -> str | None:
    """The digest a file name promises (`blobs/sha256/<hex>` or `<hex>.json`), if any."""
    normalized = _normalize(member)
    match = _BLOB_PATH.fullmatch(normalized) or _CONFIG_FILE.fullmatch(normalized)
    return f"sha256:{match.group(1)}" if match else None


def _normalize(member: str) -> str:
    return posixpath.normpath("/" + member).lstrip("/")


def _read_json(source: Source, member: str) -> Any:
    with source.open(member) as stream:
        return _parse_json(_read_limited(stream, member), member)


def _read_limited(stream: BinaryIO, what: str) -> bytes:
    """A metadata file in memory, refused past MAX_JSON_BYTES (read in small steps: one big
    read(n) would allocate n bytes up front)."""
    data = bytearray()
    while chunk := stream.read(1 << 16):
        data += chunk
        if len(data) > MAX_JSON_BYTES:
            raise InvalidInput(f"{what} is larger than {MAX_JSON_BYTES} bytes; it is no metadata")
    return bytes(data)


def _parse_json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"{what} is not valid JSON ({exc}); the archive is damaged") from exc
