"""Safe unpacking of one OCI layer blob into a directory usable as an overlayfs lowerdir.

A layer is untrusted input: every member is checked before anything is written, every
parent directory is opened with O_NOFOLLOW relative to the layer root (symlinks inside
the layer are stored, never followed), and the layer is built in a temporary directory
beside `dest` that is renamed into place only when the whole archive was accepted.
OCI whiteouts become overlayfs whiteouts (char device 0:0) and opaque directories
(xattr ``trusted.overlay.opaque=y``), so the result mounts directly as a lowerdir.
"""

from __future__ import annotations

import decimal
import errno
import gzip
import hashlib
import os
import secrets
import shutil
import stat
import tarfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

from fleetvisor.errors import AlreadyExists, InvalidInput

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OVERLAY_OPAQUE_XATTR = "trusted.overlay.opaque"

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

# Media types of tar layers (OCI and Docker v2.2); the compression named in the type
# is advisory: the bytes decide, as containerd does.
LAYER_MEDIA_TYPES = frozenset(
    {
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.diff.tar",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    }
)

_CHUNK = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MODE_BITS = 0o7777


# --------------------------------------------------------------------------- errors


def _stream_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the blob's bytes are bad" (not "the disk failed")."""
    found: list[type[BaseException]] = [tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile]
    try:
        import zstandard  # type: ignore[import-not-found]

        found.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(found)


_STREAM_ERRORS = _stream_errors()


class LayerError(InvalidInput):
    """A layer blob that fleetvisor will not unpack."""


class UnsupportedLayer(LayerError):
    """The blob's media type or compression is not one this host can unpack."""


class CorruptLayer(LayerError):
    """The blob is not a readable (compressed) tar archive."""


class LayerDigestMismatch(LayerError):
    """The blob's bytes do not hash to the digest it was fetched under."""


class UnsafeLayerMember(LayerError):
    """A member of the archive was refused; nothing of the layer was written."""

    def __init__(self, member: str, reason: str, hint: str = "") -> None:
        detail = f"layer member {member!r} refused: {reason}"
        if hint:
            detail += f"; {hint}"
        super().__init__(detail, member=member, reason=reason)
        self.member = member
        self.reason = reason


class LayerLimitExceeded(UnsafeLayerMember):
    """The archive is bigger than the UnpackLimits allow (entries, bytes or header size)."""


class WhiteoutNeedsRoot(UnsafeLayerMember):
    """Overlayfs whiteouts need CAP_MKNOD and trusted.* xattrs: only root can create them."""


# --------------------------------------------------------------------------- limits, stats


@dataclass(frozen=True)
class UnpackLimits:
    """Ceilings that bound what one layer may cost; defaults follow Go's archive/tar."""

    max_entries: int = 1_000_000
    max_bytes: int = 64 << 30  # decompressed tar stream, headers included
    max_path_bytes: int = 4095  # PATH_MAX - 1
    max_component_bytes: int = 255  # NAME_MAX
    max_header_bytes: int = 1 << 20  # one pax extended header or GNU long-name record


@dataclass(frozen=True)
class UnpackStats:
    """What one unpack did: counts per member kind, bytes and time."""

    entries: int
    files: int
    directories: int
    symlinks: int
    hardlinks: int
    whiteouts: int
    opaque_dirs: int
    content_bytes: int  # bytes of regular-file data written
    archive_bytes: int  # bytes of the (compressed) blob read
    compression: str  # "none", "gzip" or "zstd"
    seconds: float


# --------------------------------------------------------------------------- readers


class _HashingReader:
    """Reads a raw blob, hashing and counting every byte (for digest checks and stats)."""

    def __init__(self, raw: BinaryIO, algorithm: str) -> None:
        self._raw = raw
        self.hasher = hashlib.new(algorithm)
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self.hasher.update(data)
        self.count += len(data)
        return data

    def readable(self) -> bool:
        return True

    def drain(self) -> None:
        while self.read(_CHUNK):
            pass


class _BoundedReader:
    """Counts the decompressed tar stream and stops it at `limit` bytes (gzip bombs)."""

    def __init__(self, inner: Any, limit: int) -> None:
        self._inner = inner
        self._limit = limit
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data: bytes = self._inner.read(size)
        self.count += len(data)
        if self.count > self._limit:
            raise LayerLimitExceeded(
                "(archive)",
                f"decompressed stream exceeds {self._limit} bytes",
                "raise UnpackLimits.max_bytes if this layer is legitimate",
            )
        return data


def _decompressor(reader: _HashingReader, head: bytes, media_type: str) -> tuple[Any, str]:
    """Pick the decompressor from the blob's magic bytes."""
    if head.startswith(GZIP_MAGIC):
        return gzip.GzipFile(fileobj=cast(Any, reader), mode="rb"), "gzip"
    if head.startswith(ZSTD_MAGIC):
        try:
            import zstandard  # type: ignore[import-not-found]
        except ImportError:
            raise UnsupportedLayer(
                f"layer ({media_type}) is zstd-compressed and the 'zstandard' module is not "
                "installed; install it (pip install zstandard) or push the image with gzip layers"
            ) from None
        return zstandard.ZstdDecompressor().stream_reader(reader, read_across_frames=True), "zstd"
    return reader, "none"


def _guarded_tarinfo(limits: UnpackLimits) -> type[tarfile.TarInfo]:
    """A TarInfo that refuses oversized pax / GNU long-name headers before reading them."""

    special = {
        tarfile.XHDTYPE,
        tarfile.XGLTYPE,
        tarfile.SOLARIS_XHDTYPE,
        tarfile.GNUTYPE_LONGNAME,
        tarfile.GNUTYPE_LONGLINK,
    }

    class GuardedTarInfo(tarfile.TarInfo):
        def _proc_member(self, tarfile: tarfile.TarFile) -> tarfile.TarInfo:  # type: ignore[override]
            if self.type in special and self.size > limits.max_header_bytes:
                raise LayerLimitExceeded(
                    self.name,
                    f"extended header of {self.size} bytes exceeds {limits.max_header_bytes} bytes",
                    "raise UnpackLimits.max_header_bytes if this layer is legitimate",
                )
            return super()._proc_member(tarfile)  # type: ignore[misc, no-any-return]

    return GuardedTarInfo


# --------------------------------------------------------------------------- public API


def detect_compression(blob: Path) -> str:
    """Return "gzip", "zstd" or "none" from the blob's first bytes."""
    with open(blob, "rb") as raw:
        head = raw.read(4)
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return "none"


def unpack_layer(
    blob: Path,
    media_type: str,
    dest: Path,
    *,
    allow_setuid: bool = False,
    limits: UnpackLimits = UnpackLimits(),
    verify_digest: str | None = None,
) -> UnpackStats:
    """Unpack layer `blob` into the new directory `dest`, atomically; raise LayerError if refused.

    `dest` must not exist. `verify_digest` ("sha256:<hex>"), when given, is checked
    against the blob's bytes while they are read. Ownership is kept only when root.
    """
    if media_type not in LAYER_MEDIA_TYPES:
        raise UnsupportedLayer(
            f"media type {media_type!r} is not a tar layer; expected one of "
            + ", ".join(sorted(LAYER_MEDIA_TYPES))
        )
    dest = Path(dest)
    if os.path.lexists(dest):
        raise AlreadyExists(f"unpack destination {dest} already exists; remove it first")
    dest.parent.mkdir(parents=True, exist_ok=True)
    algorithm = "sha256"
    if verify_digest is not None:
        algorithm, _, _ = verify_digest.partition(":")
        if algorithm not in ("sha256", "sha512"):
            raise InvalidInput(f"digest {verify_digest!r}: use sha256:<hex> or sha512:<hex>")

    started = time.monotonic()
    tmp = dest.parent / f".{dest.name}.unpack-{secrets.token_hex(4)}"
    os.mkdir(tmp, 0o700)
    try:
        with open(blob, "rb") as raw:
            head = raw.read(4)
            raw.seek(0)
            reader = _HashingReader(raw, algorithm)
            stream, compression = _decompressor(reader, head, media_type)
            bounded = _BoundedReader(stream, limits.max_bytes)
            extractor = _Extractor(tmp, allow_setuid=allow_setuid, limits=limits)
            try:
                extractor.run(bounded)
                reader.drain()
            finally:
                extractor.close()
        if verify_digest is not None:
            actual = f"{algorithm}:{reader.hasher.hexdigest()}"
            if actual != verify_digest:
                raise LayerDigestMismatch(
                    f"blob {blob} hashes to {actual}, not {verify_digest}; "
                    "the blob is corrupt: delete it from the store and pull it again"
                )
        try:
            os.rename(tmp, dest)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise AlreadyExists(
                    f"unpack destination {dest} appeared while unpacking; remove it first"
                ) from None
            raise
    except BaseException:
        _remove_tree(tmp)
        raise
    counts = extractor.counts
    return UnpackStats(
        entries=counts["entries"],
        files=counts["files"],
        directories=counts["directories"],
        symlinks=counts["symlinks"],
        hardlinks=counts["hardlinks"],
        whiteouts=counts["whiteouts"],
        opaque_dirs=counts["opaque_dirs"],
        content_bytes=counts["content_bytes"],
        archive_bytes=reader.count,
        compression=compression,
        seconds=time.monotonic() - started,
    )


# --------------------------------------------------------------------------- extraction


def _running_as_root() -> bool:
    return os.geteuid() == 0


def _mtime_ns(member: tarfile.TarInfo) -> int:
    """Member mtime in ns; a pax mtime is parsed exactly (a float loses sub-microseconds)."""
    raw = member.pax_headers.get("mtime", member.mtime)
    try:
        return int(decimal.Decimal(str(raw)).scaleb(9).to_integral_value())
    except (ArithmeticError, ValueError):
        raise UnsafeLayerMember(member.name, f"mtime {raw!r} is not a number") from None


@dataclass
class _DirMeta:
    parts: tuple[str, ...]
    mode: int
    uid: int
    gid: int
    mtime_ns: int


class _Extractor:
    """Writes the members of one tar stream under `root`, never following a symlink."""

    def __init__(self, root: Path, *, allow_setuid: bool, limits: UnpackLimits) -> None:
        self.root = root
        self.allow_setuid = allow_setuid
        self.limits = limits
        self.as_root = _running_as_root()
        self.root_fd = os.open(root, _DIR_FLAGS)
        self._cached: tuple[tuple[str, ...], int] | None = None
        self.dirs: dict[tuple[str, ...], _DirMeta] = {}
        self.counts = dict.fromkeys(
            (
                "entries",
                "files",
                "directories",
                "symlinks",
                "hardlinks",
                "whiteouts",
                "opaque_dirs",
                "content_bytes",
            ),
            0,
        )

    def close(self) -> None:
        self._forget_cached()
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1

    # ----- driving

    def run(self, stream: _BoundedReader) -> None:
        """Extract every member, then directory metadata; unreadable bytes become CorruptLayer."""
        last = "(start of archive)"
        try:
            with tarfile.open(
                fileobj=cast(Any, stream),
                mode="r|",
                tarinfo=_guarded_tarinfo(self.limits),
            ) as tar:
                while (member := tar.next()) is not None:
                    last = member.name
                    self.counts["entries"] += 1
                    if self.counts["entries"] > self.limits.max_entries:
                        raise LayerLimitExceeded(
                            member.name,
                            f"archive has more than {self.limits.max_entries} entries",
                            "raise UnpackLimits.max_entries if this layer is legitimate",
                        )
                    self._extract(tar, member)
        except LayerError:
            raise
        except RecursionError:
            raise CorruptLayer("layer chains too many extended headers; re-push it") from None
        except _STREAM_ERRORS as exc:
            raise CorruptLayer(
                f"layer is not a valid tar archive (after {last!r}: {exc}); re-push the image"
            ) from None
        self._apply_dir_metadata()

    # ----- checks

    def _split(self, name: str, what: str = "path") -> tuple[str, ...]:
        """Validate an archive path and return its components (empty tuple = layer root)."""
        if "\x00" in name:
            raise UnsafeLayerMember(name, f"{what} contains a NUL byte")
        encoded = os.fsencode(name)
        if len(encoded) > self.limits.max_path_bytes:
            raise LayerLimitExceeded(
                name[:80] + "...",
                f"{what} is {len(encoded)} bytes, over {self.limits.max_path_bytes}",
            )
        if name.startswith("/"):
            raise UnsafeLayerMember(
                name, f"absolute {what}", "layer paths must be relative to the layer root"
            )
        parts = tuple(p for p in name.split("/") if p not in ("", "."))
        for part in parts:
            if part == "..":
                raise UnsafeLayerMember(name, f"{what} has a '..' component")
            if len(os.fsencode(part)) > self.limits.max_component_bytes:
                raise LayerLimitExceeded(
                    name, f"a {what} component is over {self.limits.max_component_bytes} bytes"
                )
        return parts

    def _check_kind(self, member: tarfile.TarInfo) -> None:
        if member.ischr() or member.isblk():
            raise UnsafeLayerMember(
                member.name,
                "device nodes are not allowed in layers",
                "create devices at run time (the runtime populates /dev)",
            )
        if member.isfifo():
            raise UnsafeLayerMember(
                member.name, "fifos are not allowed in layers", "create them at run time"
            )
        if member.issparse():
            raise UnsafeLayerMember(
                member.name, "sparse members are not supported", "rebuild the layer without sparse"
            )
        if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
            raise UnsafeLayerMember(member.name, f"unsupported member type {member.type!r}")
        if member.isreg() and member.mode & (stat.S_ISUID | stat.S_ISGID) and not self.allow_setuid:
            raise UnsafeLayerMember(
                member.name,
                f"setuid/setgid file (mode {member.mode:o})",
                "allow setuid layers on this host (allow_setuid=True) or drop the bit",
            )

    # ----- fd walking

    def _open_parent(self, member: str, parts: tuple[str, ...], *, create: bool) -> int:
        """Open the directory holding `parts[-1]`, component by component, never following.

        The last directory opened is kept (archives list siblings together); it is dropped
        whenever a directory is removed, so a cached descriptor always matches its path.
        """
        key = parts[:-1]
        if self._cached is not None and self._cached[0] == key:
            return os.dup(self._cached[1])
        fd = os.dup(self.root_fd)
        try:
            for depth, part in enumerate(key):
                child = self._open_child_dir(fd, part, member, parts[: depth + 1], create=create)
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        self._forget_cached()
        self._cached = (key, os.dup(fd))
        return fd

    def _forget_cached(self) -> None:
        if self._cached is not None:
            os.close(self._cached[1])
            self._cached = None

    def _open_child_dir(
        self, fd: int, part: str, member: str, prefix: tuple[str, ...], *, create: bool
    ) -> int:
        """Open directory `part` inside `fd`, creating it (0755) if asked and missing."""
        try:
            return os.open(part, _DIR_FLAGS, dir_fd=fd)
        except FileNotFoundError:
            if not create:
                raise UnsafeLayerMember(
                    member, f"'{'/'.join(prefix)}' does not exist in this layer"
                ) from None
            os.mkdir(part, 0o755, dir_fd=fd)
            os.chmod(part, 0o755, dir_fd=fd)
            return os.open(part, _DIR_FLAGS, dir_fd=fd)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            st = os.stat(part, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                raise UnsafeLayerMember(
                    member,
                    f"path passes through symlink '{'/'.join(prefix)}'",
                    "symlinks are never followed while unpacking",
                ) from None
            raise UnsafeLayerMember(
                member, f"'{'/'.join(prefix)}' is not a directory in this layer"
            ) from None

    def _clear(self, member: str, parent_fd: int, name: str, *, keep_dir: bool) -> bool:
        """Remove what is at `name` so a later member replaces it; True if a dir was kept."""
        try:
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return True
            self._forget_cached()  # the cached directory may be this one or below it
            try:
                os.rmdir(name, dir_fd=parent_fd)
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise UnsafeLayerMember(member, "replaces a non-empty directory") from None
                raise
            return False
        os.unlink(name, dir_fd=parent_fd)
        return False

    # ----- members

    def _extract(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        parts = self._split(member.name)
        if not parts:  # "./": metadata of the layer root itself
            if not member.isdir():
                raise UnsafeLayerMember(member.name, "the layer root must be a directory")
            self._remember_dir((), member)
            return
        name = parts[-1]
        if any(part.startswith(WHITEOUT_PREFIX) for part in parts[:-1]):
            raise UnsafeLayerMember(
                member.name,
                "a whiteout name is used as a directory (aufs metadata?)",
                "rebuild the layer without it",
            )
        if name.startswith(WHITEOUT_PREFIX):
            self._whiteout(member, parts)
            return
        self._check_kind(member)
        parent_fd = self._open_parent(member.name, parts, create=True)
        try:
            if member.isdir():
                if not self._clear(member.name, parent_fd, name, keep_dir=True):
                    os.mkdir(name, 0o700, dir_fd=parent_fd)
                self._remember_dir(parts, member)
                self.counts["directories"] += 1
            elif member.isreg():
                self._clear(member.name, parent_fd, name, keep_dir=False)
                self._write_file(tar, member, parent_fd, name)
                self.counts["files"] += 1
            elif member.issym():
                self._symlink(member, parent_fd, name)
                self.counts["symlinks"] += 1
            else:
                self._hardlink(member, parts, parent_fd, name)
                self.counts["hardlinks"] += 1
        finally:
            os.close(parent_fd)

    def _remember_dir(self, parts: tuple[str, ...], member: tarfile.TarInfo) -> None:
        mode = member.mode & _MODE_BITS  # setgid on a directory only inherits the group
        self.dirs[parts] = _DirMeta(parts, mode, member.uid, member.gid, _mtime_ns(member))

    def _write_file(
        self, tar: tarfile.TarFile, member: tarfile.TarInfo, parent_fd: int, name: str
    ) -> None:
        total = self.counts["content_bytes"] + member.size
        if total > self.limits.max_bytes:
            raise LayerLimitExceeded(
                member.name,
                f"file data would reach {total} bytes, over {self.limits.max_bytes}",
                "raise UnpackLimits.max_bytes if this layer is legitimate",
            )
        mtime = _mtime_ns(member)
        source = tar.extractfile(member)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(name, flags, 0o600, dir_fd=parent_fd)
        try:
            if source is not None:
                with open(fd, "wb", closefd=False) as out:
                    shutil.copyfileobj(source, out, _CHUNK)
            if self.as_root:
                os.fchown(fd, member.uid, member.gid)
            os.fchmod(fd, member.mode & _MODE_BITS)
            os.utime(fd, ns=(mtime, mtime))
        finally:
            os.close(fd)
        self.counts["content_bytes"] = total

    def _symlink(self, member: tarfile.TarInfo, parent_fd: int, name: str) -> None:
        target = member.linkname
        if not target or "\x00" in target:
            raise UnsafeLayerMember(member.name, "symlink has an empty or NUL-containing target")
        if len(os.fsencode(target)) > self.limits.max_path_bytes:
            raise LayerLimitExceeded(member.name, "symlink target is too long")
        self._clear(member.name, parent_fd, name, keep_dir=False)
        mtime = _mtime_ns(member)
        os.symlink(target, name, dir_fd=parent_fd)
        if self.as_root:
            os.chown(name, member.uid, member.gid, dir_fd=parent_fd, follow_symlinks=False)
        os.utime(name, ns=(mtime, mtime), dir_fd=parent_fd, follow_symlinks=False)

    def _hardlink(
        self, member: tarfile.TarInfo, parts: tuple[str, ...], parent_fd: int, name: str
    ) -> None:
        try:
            target_parts = self._split(member.linkname, "hard link target")
        except UnsafeLayerMember as exc:
            raise UnsafeLayerMember(
                member.name,
                f"hard link target {member.linkname!r} is outside the layer ({exc.reason})",
            ) from None
        if not target_parts:
            raise UnsafeLayerMember(member.name, "hard link to the layer root")
        try:
            src_fd = self._open_parent(member.name, target_parts, create=False)
        except UnsafeLayerMember as exc:
            raise UnsafeLayerMember(
                member.name, f"hard link target {member.linkname!r}: {exc.reason}"
            ) from None
        try:
            try:
                st = os.stat(target_parts[-1], dir_fd=src_fd, follow_symlinks=False)
            except FileNotFoundError:
                raise UnsafeLayerMember(
                    member.name,
                    f"hard link target {member.linkname!r} is not in this layer",
                    "hard links may only point at files earlier in the same layer",
                ) from None
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                raise UnsafeLayerMember(
                    member.name, f"hard link target {member.linkname!r} is not a file"
                )
            if target_parts == parts:
                return  # a link to itself: nothing to do
            self._clear(member.name, parent_fd, name, keep_dir=False)
            os.link(
                target_parts[-1],
                name,
                src_dir_fd=src_fd,
                dst_dir_fd=parent_fd,
                follow_symlinks=False,
            )
        finally:
            os.close(src_fd)

    def _whiteout(self, member: tarfile.TarInfo, parts: tuple[str, ...]) -> None:
        marker = parts[-1]
        if marker != OPAQUE_MARKER and marker.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
            raise UnsafeLayerMember(
                member.name, "unsupported aufs metadata entry", "rebuild the layer without it"
            )
        if not self.as_root:
            raise WhiteoutNeedsRoot(
                member.name,
                "overlayfs whiteouts and opaque directories can only be created as root",
                "run the agent as root to unpack layers that delete files",
            )
        parent_fd = self._open_parent(member.name, parts, create=True)
        try:
            if marker == OPAQUE_MARKER:
                os.setxattr(parent_fd, OVERLAY_OPAQUE_XATTR, b"y")
                self.counts["opaque_dirs"] += 1
                return
            hidden = marker[len(WHITEOUT_PREFIX) :]
            if hidden in ("", ".", ".."):
                raise UnsafeLayerMember(member.name, f"whiteout of {hidden!r} is meaningless")
            self._clear(member.name, parent_fd, hidden, keep_dir=False)
            os.mknod(hidden, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=parent_fd)
            self.counts["whiteouts"] += 1
        finally:
            os.close(parent_fd)

    # ----- directories, last (writing into a directory changes its mtime)

    def _apply_dir_metadata(self) -> None:
        self.dirs.setdefault((), _DirMeta((), 0o755, 0, 0, time.time_ns()))
        for meta in sorted(self.dirs.values(), key=lambda m: len(m.parts), reverse=True):
            try:
                fd = self._open_parent("(directory)", (*meta.parts, "."), create=False)
            except UnsafeLayerMember:
                continue  # replaced by a symlink or file later in the archive
            try:
                if self.as_root:
                    os.fchown(fd, meta.uid, meta.gid)
                os.fchmod(fd, meta.mode)
                os.utime(fd, ns=(meta.mtime_ns, meta.mtime_ns))
            finally:
                os.close(fd)


def _remove_tree(path: Path) -> None:
    """Remove a half-built layer, making read-only directories writable first when not root."""
    if not os.path.lexists(path):
        return
    if not _running_as_root():
        os.chmod(path, 0o700)
        for dirpath, dirnames, _ in os.walk(path):
            for d in dirnames:
                full = os.path.join(dirpath, d)
                if stat.S_ISDIR(os.lstat(full).st_mode):
                    os.chmod(full, 0o700)
    shutil.rmtree(path, ignore_errors=True)


__all__ = [
    "LAYER_MEDIA_TYPES",
    "CorruptLayer",
    "LayerDigestMismatch",
    "LayerError",
    "LayerLimitExceeded",
    "UnpackLimits",
    "UnpackStats",
    "UnsafeLayerMember",
    "UnsupportedLayer",
    "WhiteoutNeedsRoot",
    "detect_compression",
    "unpack_layer",
]
