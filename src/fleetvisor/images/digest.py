"""Content digests: `sha256:<64 lowercase hex>`, validated at every boundary, hashed in chunks.

Only sha256 is accepted: it is what the OCI image-spec requires of every implementation,
and one algorithm keeps the blob directory to `blobs/sha256/`.
"""

from __future__ import annotations

import gzip
import hashlib
import re
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from fleetvisor.errors import InvalidInput

ALGORITHM = "sha256"
CHUNK = 1 << 20  # 1 MiB: large enough for throughput, small enough to never hold a layer
DIGEST_FORM = "sha256:<64 lowercase hex digits>"
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


class DigestMismatch(InvalidInput):
    """Content does not hash (or measure) to what its descriptor promised: corrupt or tampered."""


def is_digest(value: str) -> bool:
    """True when `value` is a well-formed sha256 digest."""
    return _DIGEST.fullmatch(value) is not None


def validate_digest(value: str, what: str = "digest") -> str:
    """Return `value` unchanged if it is `sha256:<64 lowercase hex>`, else raise InvalidInput."""
    if not isinstance(value, str) or not is_digest(value):
        shown = repr(value)[:90]
        raise InvalidInput(f"{what} {shown} is not a valid digest; expected the form {DIGEST_FORM}")
    return value


def hex_of(digest: str) -> str:
    """The 64-hex part of a validated digest (the blob's file name)."""
    return validate_digest(digest).split(":", 1)[1]


def digest_bytes(data: bytes) -> str:
    """Digest of an in-memory value (manifests, configs: small by nature)."""
    return f"{ALGORITHM}:{hashlib.sha256(data).hexdigest()}"


def chunks_of(stream: BinaryIO, size: int = CHUNK) -> Iterator[bytes]:
    """Read `stream` to its end in chunks of at most `size` bytes."""
    while chunk := stream.read(size):
        yield chunk


def digest_chunks(chunks: Iterable[bytes]) -> tuple[str, int]:
    """Digest and byte count of a chunk iterator."""
    hasher = hashlib.sha256()
    total = 0
    for chunk in chunks:
        hasher.update(chunk)
        total += len(chunk)
    return f"{ALGORITHM}:{hasher.hexdigest()}", total


def digest_stream(stream: BinaryIO) -> tuple[str, int]:
    """Digest and size of a binary stream, read in chunks to its end."""
    return digest_chunks(chunks_of(stream))


def digest_file(path: Path) -> tuple[str, int]:
    """Digest and size of a file, read in chunks."""
    with path.open("rb") as stream:
        return digest_stream(stream)


def uncompressed_digest(path: Path) -> str:
    """Digest of a layer's uncompressed tar (its `diff_id`), gunzipping on the fly if needed."""
    with path.open("rb") as raw:
        gzipped = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        if not gzipped:
            return digest_stream(raw)[0]
        try:
            with gzip.GzipFile(fileobj=raw) as unzipped:
                return digest_stream(unzipped)[0]  # type: ignore[arg-type]
        except (OSError, EOFError, zlib.error) as exc:
            raise DigestMismatch(
                f"layer {path.name} is not a valid gzip stream ({exc}); the archive is "
                "corrupt or truncated: export the image again"
            ) from exc
