"""The image store: one OCI image layout on disk (`oci-layout`, `index.json`, `blobs/sha256/`).

Blobs are written once, verified against their digest, and renamed into place, so readers
never see a partial blob and several processes may write the same blob at once. Every
image is an entry of `index.json`, annotated `org.opencontainers.image.ref.name` =
`name:tag` and `dev.fleetvisor.image.repository` = `name`; the index is rewritten under
an fcntl lock and replaced atomically. Blobs no entry reaches are garbage (`gc`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from fleetvisor.errors import InvalidInput, NotFound
from fleetvisor.images.digest import (
    ALGORITHM,
    DigestMismatch,
    chunks_of,
    digest_bytes,
    digest_file,
    hex_of,
    is_digest,
    validate_digest,
)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCTET_STREAM = "application/octet-stream"

IMAGE_MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
MANIFEST_TYPES = IMAGE_MANIFEST_TYPES | INDEX_TYPES
IMAGE_CONFIG_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})
# Layers a registry never holds (Windows base layers); a manifest may name them absent.
FOREIGN_LAYER_TYPES = frozenset(
    {
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    }
)

REF_NAME = "org.opencontainers.image.ref.name"
REPOSITORY = "dev.fleetvisor.image.repository"
LAYOUT_VERSION = "1.0.0"
MAX_MANIFEST_BYTES = 4 << 20  # the distribution spec asks registries to take at least 4 MiB
DEFAULT_GC_MIN_AGE = 600.0  # seconds a fresh unreferenced blob is spared (a push in flight)
STALE_TEMP_AGE = 86_400.0  # temp files older than this are debris of a crashed writer
PLATFORM = ("linux", "amd64")

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME_PATTERN = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
TAG_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
MAX_NAME = 255
NAME_ADVICE = (
    "use lowercase letters and digits, with '.', '_', '__' or '-' between them, and "
    "components joined by '/', at most 255 characters (e.g. 'fleet/busybox')"
)
TAG_ADVICE = "use 1-128 of A-Z a-z 0-9 _ . -, not starting with '.' or '-' (e.g. 'latest', 'v1.2')"


class MissingBlobs(InvalidInput):
    """A manifest names blobs the store lacks: push or import them before the manifest."""

    def __init__(self, detail: str, digests: list[str]) -> None:
        super().__init__(detail, missing=digests)
        self.digests = digests


class CorruptStore(Exception):
    """The layout on disk is damaged (not a user error): restore index.json or re-import."""


def validate_name(name: str) -> str:
    """Return `name` if it is a repository name of the distribution spec, else InvalidInput."""
    if len(name) > MAX_NAME or NAME_PATTERN.fullmatch(name) is None:
        raise InvalidInput(f"image name {name[:100]!r} is invalid: {NAME_ADVICE}")
    return name


def validate_tag(tag: str) -> str:
    """Return `tag` if it is a valid tag, else InvalidInput."""
    if TAG_PATTERN.fullmatch(tag) is None:
        raise InvalidInput(f"tag {tag[:140]!r} is invalid: {TAG_ADVICE}")
    return tag


@dataclass(frozen=True)
class Reference:
    """`name`, `name:tag` or `name@sha256:…`; a reference without either means `:latest`."""

    name: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, ref: str) -> Reference:
        """Parse and validate; the digest wins when both a tag and a digest are given."""
        if not isinstance(ref, str) or not ref:
            raise InvalidInput("empty image reference; use NAME[:TAG] or NAME@sha256:<hex>")
        rest, digest = ref, None
        if "@" in ref:
            rest, digest = ref.split("@", 1)
            validate_digest(digest, f"digest of image reference {ref[:120]!r}")
        name, tag = rest, None
        colon = rest.rfind(":")
        if colon > rest.rfind("/"):
            name, tag = rest[:colon], validate_tag(rest[colon + 1 :])
        validate_name(name)
        if digest is None and tag is None:
            tag = "latest"
        return cls(name, tag, digest)

    def __str__(self) -> str:
        if self.digest:
            return f"{self.name}@{self.digest}"
        return f"{self.name}:{self.tag}"


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor: what a blob is, its digest and its size."""

    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    platform: dict[str, Any] | None = None

    @classmethod
    def from_json(cls, data: Any, where: str) -> Descriptor:
        """Validate one descriptor object of a manifest/index; `where` names it in errors."""
        if not isinstance(data, dict):
            raise InvalidInput(f"{where} must be a descriptor object")
        media_type = data.get("mediaType")
        if not isinstance(media_type, str) or not media_type:
            raise InvalidInput(f"{where} needs a 'mediaType' string")
        digest = validate_digest(data.get("digest"), f"{where}.digest")  # type: ignore[arg-type]
        size = data.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidInput(f"{where}.size must be a non-negative integer")
        annotations = data.get("annotations") or {}
        if not isinstance(annotations, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()
        ):
            raise InvalidInput(f"{where}.annotations must map strings to strings")
        platform = data.get("platform")
        if platform is not None and not isinstance(platform, dict):
            raise InvalidInput(f"{where}.platform must be an object")
        return cls(media_type, digest, size, dict(annotations), platform)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest}
        out["size"] = self.size
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform is not None:
            out["platform"] = dict(self.platform)
        return out


@dataclass(frozen=True)
class Manifest:
    """A parsed image manifest: the config blob and the layers, bottom first."""

    digest: str
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def blobs(self) -> tuple[Descriptor, ...]:
        return (self.config, *self.layers)


@dataclass(frozen=True)
class RawManifest:
    """A manifest (or index) exactly as stored: what a registry serves byte for byte."""

    digest: str
    media_type: str
    data: bytes


@dataclass(frozen=True)
class ImageInfo:
    """One tagged image of the store, for listings."""

    name: str
    tag: str | None
    digest: str
    size: int
    layers: int
    created: str | None
    media_type: str

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.tag}" if self.tag else f"{self.name}@{self.digest}"


def parse_manifest_document(
    data: bytes, media_type: str | None = None
) -> tuple[str, dict[str, Any]]:
    """Validate a manifest or index document; return its media type and the parsed JSON.

    `media_type` is what the sender declared (e.g. Content-Type); without it the body's
    `mediaType` field decides, and a body without one is typed by its shape.
    """
    if len(data) > MAX_MANIFEST_BYTES:
        raise InvalidInput(f"manifest is {len(data)} bytes; the limit is {MAX_MANIFEST_BYTES}")
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(
            f"manifest is not valid JSON ({exc}); send the manifest document"
        ) from exc
    if not isinstance(doc, dict):
        raise InvalidInput("manifest must be a JSON object")
    if doc.get("schemaVersion") != 2:
        raise InvalidInput(
            "manifest schemaVersion must be 2 (OCI or Docker schema 2); "
            "convert schema-1 images with skopeo copy --format oci"
        )
    declared = doc.get("mediaType")
    if declared is not None and not isinstance(declared, str):
        raise InvalidInput("manifest mediaType must be a string")
    if media_type and declared and media_type != declared:
        raise InvalidInput(
            f"manifest declares mediaType {declared!r} but was sent as {media_type!r}; "
            "make the Content-Type match the document"
        )
    kind = media_type or declared or (OCI_INDEX if "manifests" in doc else OCI_MANIFEST)
    if kind not in MANIFEST_TYPES:
        raise InvalidInput(
            f"manifest media type {kind!r} is not supported; send one of {sorted(MANIFEST_TYPES)}"
        )
    if kind in INDEX_TYPES:
        children = doc.get("manifests")
        if not isinstance(children, list):
            raise InvalidInput("an image index needs a 'manifests' list")
        for i, child in enumerate(children):
            Descriptor.from_json(child, f"manifests[{i}]")
    else:
        Descriptor.from_json(doc.get("config"), "config")
        layers = doc.get("layers", [])
        if not isinstance(layers, list):
            raise InvalidInput("manifest 'layers' must be a list of descriptors")
        for i, layer in enumerate(layers):
            Descriptor.from_json(layer, f"layers[{i}]")
    return kind, doc


def referenced(doc: dict[str, Any], media_type: str) -> list[Descriptor]:
    """Descriptors a (validated) manifest or index points at: what must be stored first."""
    if media_type in INDEX_TYPES:
        return [Descriptor.from_json(d, "manifests[]") for d in doc["manifests"]]
    return [Descriptor.from_json(doc["config"], "config")] + [
        Descriptor.from_json(d, "layers[]") for d in doc.get("layers", [])
    ]


def pick_platform(children: list[Descriptor]) -> Descriptor:
    """The linux/amd64 entry of an image index (the only platform fleetvisor hosts run)."""
    for child in children:
        platform = child.platform or {}
        if (platform.get("os"), platform.get("architecture")) == PLATFORM:
            return child
    if len(children) == 1 and not children[0].platform:
        return children[0]
    offered = [
        f"{(c.platform or {}).get('os')}/{(c.platform or {}).get('architecture')}" for c in children
    ]
    raise NotFound(
        f"the image index has no linux/amd64 image (it offers {offered}); "
        "build or pull a linux/amd64 variant"
    )


class ImageStore:
    """An OCI image layout rooted at `root`, shared by the processes of one machine."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.blob_dir = self.root / "blobs" / ALGORITHM
        self.index_path = self.root / "index.json"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        layout = self.root / "oci-layout"
        if not layout.exists():
            _atomic_write(layout, json.dumps({"imageLayoutVersion": LAYOUT_VERSION}).encode())
        if not self.index_path.exists():
            with self._locked():
                if not self.index_path.exists():
                    self._write_index([])

    # ---- blobs -------------------------------------------------------------------------

    @property
    def uploads_dir(self) -> Path:
        """Scratch space on the store's filesystem, for files later moved in by put_blob_file."""
        path = self.root / "uploads"
        path.mkdir(exist_ok=True)
        return path

    def has_blob(self, digest: str) -> bool:
        return (self.blob_dir / hex_of(digest)).is_file()

    def blob_path(self, digest: str) -> Path:
        """Path of a stored blob; NotFound if the store lacks it."""
        path = self.blob_dir / hex_of(digest)
        if not path.is_file():
            raise NotFound(
                f"blob {digest} is not in the image store {self.root}; "
                "pull or import the image that holds it"
            )
        return path

    def open_blob(self, digest: str) -> BinaryIO:
        """Open a stored blob for reading (the open file survives a concurrent gc)."""
        path = self.blob_path(digest)
        try:
            return path.open("rb")
        except FileNotFoundError:
            raise NotFound(f"blob {digest} was removed from the image store meanwhile") from None

    def blob_size(self, digest: str) -> int:
        return self.blob_path(digest).stat().st_size

    def read_blob(self, digest: str) -> bytes:
        """A small blob (manifest, config) in memory, verified against its digest."""
        data = self.blob_path(digest).read_bytes()
        if digest_bytes(data) != digest:
            raise CorruptStore(
                f"blob {digest} in {self.blob_dir} is corrupt; remove and re-pull it"
            )
        return data

    def delete_blob(self, digest: str) -> bool:
        """Remove one blob; False if it was absent. Referenced blobs are the caller's concern."""
        try:
            (self.blob_dir / hex_of(digest)).unlink()
        except FileNotFoundError:
            return False
        return True

    def put_blob(
        self,
        source: bytes | BinaryIO | Iterable[bytes],
        expected_digest: str | None = None,
        *,
        expected_size: int | None = None,
        media_type: str = OCTET_STREAM,
    ) -> Descriptor:
        """Store content, verifying it while it streams to a temp file, then rename into place.

        With `expected_digest` of a blob already stored, the source is not read at all.
        A digest or size mismatch raises DigestMismatch and stores nothing.
        """
        if expected_digest is not None:
            validate_digest(expected_digest, "expected digest")
            existing = self.blob_dir / hex_of(expected_digest)
            if existing.is_file() and (
                expected_size is None or existing.stat().st_size == expected_size
            ):
                _touch(existing)
                return Descriptor(media_type, expected_digest, existing.stat().st_size)
        if isinstance(source, bytes):
            chunks: Iterable[bytes] = [source]
        elif hasattr(source, "read"):
            chunks = chunks_of(source)  # type: ignore[arg-type]
        else:
            chunks = source  # type: ignore[assignment]
        fd, tmp_name = tempfile.mkstemp(dir=self.blob_dir, prefix=".tmp-")
        tmp = Path(tmp_name)
        try:
            hasher, size = hashlib.sha256(), 0
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    size += len(chunk)
                    if expected_size is not None and size > expected_size:
                        raise DigestMismatch(
                            f"blob {expected_digest or ''} is larger than its declared "
                            f"{expected_size} bytes; the source is corrupt or not this blob"
                        )
                    hasher.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            digest = f"{ALGORITHM}:{hasher.hexdigest()}"
            _verify(digest, size, expected_digest, expected_size)
            return self._commit(tmp, digest, size, media_type)
        finally:
            tmp.unlink(missing_ok=True)

    def put_blob_file(
        self,
        path: Path,
        expected_digest: str,
        *,
        expected_size: int | None = None,
        media_type: str = OCTET_STREAM,
    ) -> Descriptor:
        """Verify a finished file and move it into the store (no copy on the same filesystem).

        The file is consumed either way: moved in, or deleted when it fails verification.
        """
        validate_digest(expected_digest, "expected digest")
        try:
            digest, size = digest_file(path)
            _verify(digest, size, expected_digest, expected_size)
            _fsync(path)
            try:
                return self._commit(path, digest, size, media_type)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
            with path.open("rb") as stream:  # another filesystem: copy, verifying again
                return self.put_blob(stream, expected_digest, media_type=media_type)
        finally:
            path.unlink(missing_ok=True)

    def _commit(self, tmp: Path, digest: str, size: int, media_type: str) -> Descriptor:
        """Rename verified content into place; a racing writer's identical copy is replaced
        atomically (readers keep their open file), and a fresh mtime shields it from gc."""
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.blob_dir / hex_of(digest))
        return Descriptor(media_type, digest, size)

    # ---- manifests and the index -------------------------------------------------------

    def put_manifest(
        self, name: str, tag: str | None, manifest_bytes: bytes, media_type: str | None = None
    ) -> str:
        """Store a manifest or index whose blobs are all present, and tag it `name:tag`.

        With tag None the manifest is recorded untagged under `name` (a push by digest),
        which keeps it from gc. Answers the manifest's digest.
        """
        validate_name(name)
        if tag is not None:
            validate_tag(tag)
        kind, doc = parse_manifest_document(manifest_bytes, media_type)
        digest = digest_bytes(manifest_bytes)
        annotations = {REPOSITORY: name} | ({REF_NAME: f"{name}:{tag}"} if tag else {})
        entry = Descriptor(kind, digest, len(manifest_bytes), annotations)
        with self._locked():  # under the lock a concurrent gc cannot take what we checked
            self._check_present(referenced(doc, kind), kind)
            self.put_blob(manifest_bytes, digest, media_type=kind)
            entries = [e for e in self._read_index() if not _same_slot(e, name, tag, digest)]
            entries.append(entry.to_json())
            self._write_index(entries)
        return digest

    def _check_present(self, descriptors: list[Descriptor], kind: str) -> None:
        missing: list[str] = []
        for desc in descriptors:
            if desc.media_type in FOREIGN_LAYER_TYPES:
                continue
            path = self.blob_dir / hex_of(desc.digest)
            if not path.is_file():
                missing.append(desc.digest)
            elif path.stat().st_size != desc.size:
                raise DigestMismatch(
                    f"blob {desc.digest} is {path.stat().st_size} bytes but the manifest says "
                    f"{desc.size}; fix the manifest's size field"
                )
        if missing:
            what = "manifests" if kind in INDEX_TYPES else "blobs"
            raise MissingBlobs(
                f"the manifest references {len(missing)} {what} the store lacks "
                f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); "
                f"upload them before the manifest",
                missing,
            )

    def resolve(self, ref: str | Reference) -> str:
        """The manifest digest `ref` names; NotFound when the store has no such image."""
        return self._entry(ref).digest

    def raw_manifest(self, ref: str | Reference) -> RawManifest:
        """The manifest or index `ref` names, bytes as stored, with its media type."""
        entry = self._entry(ref)
        return RawManifest(entry.digest, entry.media_type, self.read_blob(entry.digest))

    def manifest(self, ref: str | Reference) -> Manifest:
        """The image manifest `ref` names; an image index resolves to its linux/amd64 image."""
        entry = self._entry(ref)
        return self.manifest_by_digest(entry.digest, entry.media_type)

    def manifest_by_digest(self, digest: str, media_type: str | None = None) -> Manifest:
        """Parse a stored manifest blob (following an index to its linux/amd64 image)."""
        kind, doc = parse_manifest_document(self.read_blob(digest), media_type)
        if kind in INDEX_TYPES:
            child = pick_platform(referenced(doc, kind))
            return self.manifest_by_digest(child.digest, child.media_type)
        config, *layers = referenced(doc, kind)
        annotations = doc.get("annotations") or {}
        return Manifest(digest, kind, config, tuple(layers), dict(annotations))

    def image_config(self, ref: str | Reference) -> dict[str, Any]:
        """The runtime defaults of an image (Entrypoint, Cmd, Env, WorkingDir, User) or {}."""
        config = self.manifest(ref).config
        if config.media_type not in IMAGE_CONFIG_TYPES:
            return {}  # an artifact (e.g. a VM disk) has no container config
        try:
            doc = json.loads(self.read_blob(config.digest))
        except json.JSONDecodeError as exc:
            raise CorruptStore(f"config blob {config.digest} is not JSON") from exc
        section = doc.get("config") if isinstance(doc, dict) else None
        return section if isinstance(section, dict) else {}

    def info(self, ref: str | Reference) -> ImageInfo:
        """Listing data of one image."""
        parsed = ref if isinstance(ref, Reference) else Reference.parse(ref)
        entry = self._entry(parsed)
        return self._info(parsed.name, parsed.tag if parsed.digest is None else None, entry)

    def images(self) -> list[ImageInfo]:
        """Every tagged image, sorted by reference (untagged pushes are kept but not listed)."""
        out = []
        for raw in self._read_index():
            slot = _slot(raw)
            if slot is None or slot[1] is None:
                continue
            with contextlib.suppress(NotFound, InvalidInput, CorruptStore):
                out.append(self._info(slot[0], slot[1], Descriptor.from_json(raw, "index.json")))
        return sorted(out, key=lambda info: info.ref)

    def tags(self, name: str) -> list[str]:
        """Tags of one repository, sorted; NotFound if the store has nothing under `name`."""
        validate_name(name)
        slots = [s for s in map(_slot, self._read_index()) if s and s[0] == name]
        if not slots:
            raise NotFound(f"no image named {name!r} in the store; push or import it first")
        return sorted({tag for _, tag in slots if tag is not None})

    def remove(self, ref: str | Reference) -> None:
        """Untag `name:tag`, or drop every entry of `name@digest`. Blobs wait for gc."""
        parsed = ref if isinstance(ref, Reference) else Reference.parse(ref)

        def named(entry: dict[str, Any]) -> bool:
            slot = _slot(entry)
            if slot is None or slot[0] != parsed.name:
                return False
            if parsed.digest is not None:
                return entry.get("digest") == parsed.digest
            return slot[1] == parsed.tag

        with self._locked():
            entries = self._read_index()
            keep = [e for e in entries if not named(e)]
            if len(keep) == len(entries):
                raise NotFound(f"no image {parsed} in the store; `images` lists what there is")
            self._write_index(keep)

    def gc(self, *, min_age: float = DEFAULT_GC_MIN_AGE) -> int:
        """Delete blobs no index entry reaches; answers the bytes freed.

        Blobs younger than `min_age` seconds are spared: they may belong to a push or an
        import whose manifest is not indexed yet. Pass 0 when nothing else writes.
        """
        now = time.time()
        freed = 0
        with self._locked():
            live = self._reachable()
            for path in self.blob_dir.iterdir():
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue
                age = now - stat.st_mtime
                if path.name.startswith("."):
                    if age > STALE_TEMP_AGE:
                        path.unlink(missing_ok=True)
                    continue
                if f"{ALGORITHM}:{path.name}" in live or age < min_age:
                    continue
                path.unlink(missing_ok=True)
                freed += stat.st_size
        return freed

    def _reachable(self) -> set[str]:
        live: set[str] = set()
        todo = [(e.get("digest", ""), e.get("mediaType", "")) for e in self._read_index()]
        while todo:
            digest, media_type = todo.pop()
            if not is_digest(digest) or digest in live:
                continue
            live.add(digest)
            if media_type in MANIFEST_TYPES and self.has_blob(digest):
                try:
                    kind, doc = parse_manifest_document(self.read_blob(digest), media_type)
                except (InvalidInput, CorruptStore):
                    continue
                todo.extend((d.digest, d.media_type) for d in referenced(doc, kind))
        return live

    def _info(self, name: str, tag: str | None, entry: Descriptor) -> ImageInfo:
        manifest = self.manifest_by_digest(entry.digest, entry.media_type)
        size = entry.size + sum(d.size for d in manifest.blobs)
        if manifest.digest != entry.digest:
            size += self.blob_size(manifest.digest)
        created = None
        if manifest.config.media_type in IMAGE_CONFIG_TYPES:
            with contextlib.suppress(json.JSONDecodeError, NotFound, CorruptStore):
                doc = json.loads(self.read_blob(manifest.config.digest))
                value = doc.get("created") if isinstance(doc, dict) else None
                created = value if isinstance(value, str) else None
        return ImageInfo(
            name, tag, entry.digest, size, len(manifest.layers), created, entry.media_type
        )

    def _entry(self, ref: str | Reference) -> Descriptor:
        parsed = ref if isinstance(ref, Reference) else Reference.parse(ref)
        for raw in reversed(self._read_index()):
            slot = _slot(raw)
            if slot is None or slot[0] != parsed.name:
                continue
            if (parsed.digest is not None and raw.get("digest") == parsed.digest) or (
                parsed.digest is None and slot[1] == parsed.tag
            ):
                return Descriptor.from_json(raw, "index.json entry")
        raise NotFound(f"no image {parsed} in the store; push, pull or import it first")

    def _read_index(self) -> list[dict[str, Any]]:
        try:
            doc = json.loads(self.index_path.read_bytes())
        except FileNotFoundError:
            return []
        except json.JSONDecodeError as exc:
            raise CorruptStore(f"{self.index_path} is not valid JSON: restore it") from exc
        entries = doc.get("manifests") if isinstance(doc, dict) else None
        if not isinstance(entries, list):
            raise CorruptStore(f"{self.index_path} has no 'manifests' list: restore it")
        return [e for e in entries if isinstance(e, dict)]

    def _write_index(self, entries: list[dict[str, Any]]) -> None:
        doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
        _atomic_write(self.index_path, json.dumps(doc, indent=1).encode())

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive lock on the index, across processes and threads (flock per open file)."""
        with (self.root / ".index.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _slot(entry: dict[str, Any]) -> tuple[str, str | None] | None:
    """(name, tag) of an index entry; tag None for an untagged entry, None if foreign."""
    annotations = entry.get("annotations") or {}
    name = annotations.get(REPOSITORY)
    ref_name = annotations.get(REF_NAME)
    if isinstance(name, str):
        prefix = name + ":"
        if isinstance(ref_name, str) and ref_name.startswith(prefix):
            return name, ref_name[len(prefix) :]
        return name, None
    if isinstance(ref_name, str) and ":" in ref_name:  # a plain `name:tag` (containerd style)
        base, tag = ref_name.rsplit(":", 1)
        if NAME_PATTERN.fullmatch(base) and TAG_PATTERN.fullmatch(tag):
            return base, tag
    return None


def _same_slot(entry: dict[str, Any], name: str, tag: str | None, digest: str) -> bool:
    """True when `entry` is replaced by a new (name, tag, digest) entry."""
    slot = _slot(entry)
    if slot is None or slot[0] != name:
        return False
    if tag is not None:  # the tag moves; an untagged record of the same digest is absorbed
        return slot[1] == tag or (slot[1] is None and entry.get("digest") == digest)
    return slot[1] is None and entry.get("digest") == digest


def _verify(digest: str, size: int, expected_digest: str | None, expected_size: int | None) -> None:
    if expected_size is not None and size != expected_size:
        raise DigestMismatch(
            f"blob {expected_digest or digest} has {size} bytes but {expected_size} were "
            "declared; the content is truncated or corrupt"
        )
    if expected_digest is not None and digest != expected_digest:
        raise DigestMismatch(
            f"content hashes to {digest}, not the expected {expected_digest}; "
            "it is corrupt or tampered with: fetch or export it again"
        )


def _fsync(path: Path) -> None:
    """Flush a file's data to disk before it is renamed into the store."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _touch(path: Path) -> None:
    """Renew a blob's mtime, so a gc running now sees it as freshly wanted."""
    with contextlib.suppress(OSError):
        os.utime(path)


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
