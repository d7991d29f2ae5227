"""Safe layer unpacking: crafted malicious tars are refused and leave nothing behind;
normal layers (symlinks, hard links, whiteouts, opaque dirs) come out as overlayfs wants."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

from fleetvisor.errors import AlreadyExists, InvalidInput
from fleetvisor.images import unpack
from fleetvisor.images.unpack import (
    CorruptLayer,
    LayerDigestMismatch,
    LayerLimitExceeded,
    UnpackLimits,
    UnsafeLayerMember,
    UnsupportedLayer,
    WhiteoutNeedsRoot,
    unpack_layer,
)

TAR = "application/vnd.oci.image.layer.v1.tar"
TAR_GZ = "application/vnd.oci.image.layer.v1.tar+gzip"
IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (whiteouts, ownership)")


# --------------------------------------------------------------------------- helpers


@dataclass
class Member:
    """One crafted tar member."""

    name: str
    kind: bytes = tarfile.REGTYPE
    data: bytes = b""
    mode: int = 0o644
    linkname: str = ""
    uid: int = 0
    gid: int = 0
    mtime: int = 1_600_000_000
    devmajor: int = 0
    devminor: int = 0
    pax: dict[str, str] | None = None


def write_tar(
    path: Path,
    members: Iterable[Member],
    *,
    compress: bool = False,
    fmt: int = tarfile.PAX_FORMAT,
) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for m in members:
            info = tarfile.TarInfo(m.name)
            info.type = m.kind
            info.mode = m.mode
            info.uid, info.gid, info.mtime = m.uid, m.gid, m.mtime
            info.linkname = m.linkname
            info.devmajor, info.devminor = m.devmajor, m.devminor
            if m.pax:
                info.pax_headers = dict(m.pax)
            if m.kind in (tarfile.REGTYPE, tarfile.AREGTYPE):
                info.size = len(m.data)
                tar.addfile(info, io.BytesIO(m.data))
            else:
                tar.addfile(info)
    raw = buf.getvalue()
    path.write_bytes(gzip.compress(raw, mtime=0) if compress else raw)
    return path


def d(name: str, mode: int = 0o755, **kw: object) -> Member:
    return Member(name, tarfile.DIRTYPE, mode=mode, **kw)  # type: ignore[arg-type]


def f(name: str, data: bytes = b"x", mode: int = 0o644, **kw: object) -> Member:
    return Member(name, tarfile.REGTYPE, data=data, mode=mode, **kw)  # type: ignore[arg-type]


def sym(name: str, target: str) -> Member:
    return Member(name, tarfile.SYMTYPE, linkname=target, mode=0o777)


def hard(name: str, target: str) -> Member:
    return Member(name, tarfile.LNKTYPE, linkname=target)


class Arena:
    """A directory holding the destination, a sentinel file and an 'outside' directory.

    `snapshot()` records every path (and file content) under the test's tmp_path, so a
    refused unpack can be checked to have written nothing anywhere.
    """

    def __init__(self, tmp_path: Path) -> None:
        self.top = tmp_path
        self.base = tmp_path / "arena"
        self.outside = self.base / "outside"
        self.outside.mkdir(parents=True)
        (self.outside / "secret").write_text("secret")
        self.sentinel = self.base / "sentinel.txt"
        self.sentinel.write_text("keep")
        self.dest = self.base / "layer"
        self.blob = tmp_path / "blob.tar"

    def snapshot(self) -> dict[str, object]:
        seen: dict[str, object] = {}
        for dirpath, dirnames, filenames in os.walk(self.top):
            for name in dirnames + filenames:
                full = Path(dirpath) / name
                st = full.lstat()
                if stat.S_ISREG(st.st_mode):  # directory mtimes move with the temp dir
                    seen[str(full.relative_to(self.top))] = (
                        st.st_mode,
                        st.st_mtime_ns,
                        full.read_bytes(),
                    )
                else:
                    seen[str(full.relative_to(self.top))] = (st.st_mode,)
        return seen

    def refuse(
        self,
        members: Iterable[Member],
        error: type[Exception] = UnsafeLayerMember,
        *,
        match: str | None = None,
        **kwargs: object,
    ) -> Exception:
        """Unpack a crafted tar, expect `error`, and check nothing appeared or changed."""
        write_tar(self.blob, members)
        before = self.snapshot()
        with pytest.raises(error, match=match) as caught:
            unpack_layer(self.blob, TAR, self.dest, **kwargs)  # type: ignore[arg-type]
        assert self.snapshot() == before, "a refused layer wrote or changed files"
        assert not os.path.lexists(self.dest)
        assert self.sentinel.read_text() == "keep"
        assert isinstance(caught.value, InvalidInput)
        return caught.value


@pytest.fixture
def arena(tmp_path: Path) -> Arena:
    return Arena(tmp_path)


# --------------------------------------------------------------------------- malicious


def test_absolute_member_path(arena: Arena) -> None:
    target = str(arena.base / "pwned")
    exc = arena.refuse([f("ok"), f(target)], match="absolute path")
    assert isinstance(exc, UnsafeLayerMember)
    assert exc.member == target
    assert not (arena.base / "pwned").exists()


@pytest.mark.parametrize("name", ["../pwned", "a/../../pwned", "./../pwned", "a/b/../../../x"])
def test_dotdot_component(arena: Arena, name: str) -> None:
    exc = arena.refuse([d("a"), f(name)], match=r"'\.\.' component")
    assert isinstance(exc, UnsafeLayerMember) and exc.member == name


def test_dotdot_even_when_it_stays_inside(arena: Arena) -> None:
    arena.refuse([d("a"), f("a/../b")], match=r"'\.\.' component")


def test_write_through_absolute_symlink(arena: Arena) -> None:
    arena.refuse([sym("link", str(arena.outside)), f("link/pwned")], match="through symlink 'link'")
    assert sorted(os.listdir(arena.outside)) == ["secret"]


def test_write_through_relative_symlink(arena: Arena) -> None:
    arena.refuse(
        [d("a"), sym("a/up", "../../outside"), f("a/up/pwned")], match="through symlink 'a/up'"
    )


def test_directory_replaced_by_symlink_then_written_through(arena: Arena) -> None:
    members = [d("etc"), sym("etc", str(arena.outside)), f("etc/pwned")]
    arena.refuse(members, match="through symlink 'etc'")


def test_symlink_as_directory_entry_is_not_followed(arena: Arena) -> None:
    arena.refuse([sym("x", str(arena.outside)), d("x/sub")], match="through symlink 'x'")


def test_hardlink_to_absolute_path(arena: Arena) -> None:
    arena.refuse([hard("h", str(arena.sentinel))], match="hard link target .* outside the layer")


def test_hardlink_with_dotdot(arena: Arena) -> None:
    arena.refuse([hard("h", "../sentinel.txt")], match="hard link target .* outside the layer")


def test_hardlink_through_symlink(arena: Arena) -> None:
    members = [sym("link", str(arena.outside)), hard("h", "link/secret")]
    arena.refuse(members, match="hard link target 'link/secret': path passes through symlink")


def test_hardlink_to_missing_target(arena: Arena) -> None:
    arena.refuse([hard("h", "etc/shadow")], match="does not exist in this layer")
    arena.refuse([d("etc"), hard("h", "etc/shadow")], match="not in this layer")


def test_hardlink_to_directory(arena: Arena) -> None:
    arena.refuse([d("dir"), hard("h", "dir")], match="is not a file")


@pytest.mark.parametrize(
    ("kind", "label"),
    [(tarfile.CHRTYPE, "device"), (tarfile.BLKTYPE, "device"), (tarfile.FIFOTYPE, "fifo")],
)
def test_device_nodes_and_fifos(arena: Arena, kind: bytes, label: str) -> None:
    node = Member("dev/sda", kind, devmajor=8, devminor=0)
    arena.refuse([d("dev"), node], match=label)


@pytest.mark.parametrize("mode", [0o4755, 0o2755, 0o6711])
def test_setuid_setgid_files(arena: Arena, mode: int) -> None:
    exc = arena.refuse([f("bin/su", b"#!", mode=mode)], match="setuid/setgid")
    assert "allow_setuid" in str(exc)


def test_setuid_allowed_when_asked(arena: Arena) -> None:
    write_tar(arena.blob, [f("bin/su", b"#!", mode=0o4755), d("var/mail", mode=0o2775)])
    unpack_layer(arena.blob, TAR, arena.dest, allow_setuid=True)
    assert stat.S_IMODE((arena.dest / "bin/su").stat().st_mode) == 0o4755
    assert stat.S_IMODE((arena.dest / "var/mail").stat().st_mode) == 0o2775


def test_setgid_directory_is_not_a_privilege(arena: Arena) -> None:
    write_tar(arena.blob, [d("var/local", mode=0o2775)])
    unpack_layer(arena.blob, TAR, arena.dest)
    assert stat.S_IMODE((arena.dest / "var/local").stat().st_mode) == 0o2775


def test_oversized_pax_header(arena: Arena) -> None:
    big = f("a", pax={"comment": "x" * 4096})
    exc = arena.refuse([big], LayerLimitExceeded, limits=UnpackLimits(max_header_bytes=1024))
    assert "extended header" in str(exc)


def test_oversized_pax_header_default_limit(arena: Arena) -> None:
    big = f("a", pax={"comment": "x" * (1 << 20)})
    arena.refuse([big], LayerLimitExceeded, match="extended header")


def test_oversized_gnu_long_name(arena: Arena) -> None:
    write_tar(arena.blob, [f("a/" + "b" * 2000)], fmt=tarfile.GNU_FORMAT)
    before = arena.snapshot()
    with pytest.raises(LayerLimitExceeded, match="extended header"):
        unpack_layer(arena.blob, TAR, arena.dest, limits=UnpackLimits(max_header_bytes=1024))
    assert arena.snapshot() == before


def test_path_too_long(arena: Arena) -> None:
    deep = "/".join(["d" * 200] * 25)  # 5024 bytes, each component legal
    arena.refuse([f(deep)], LayerLimitExceeded, match="over 4095")


def test_component_too_long(arena: Arena) -> None:
    arena.refuse([f("a/" + "n" * 256)], LayerLimitExceeded, match="over 255 bytes")


def test_too_many_entries(arena: Arena) -> None:
    members = [f(f"f{i}") for i in range(10)]
    exc = arena.refuse(members, LayerLimitExceeded, limits=UnpackLimits(max_entries=5))
    assert isinstance(exc, LayerLimitExceeded) and exc.member == "f5"


def test_too_many_bytes(arena: Arena) -> None:
    members = [f("small", b"a" * 100), f("big", b"b" * 5000)]
    exc = arena.refuse(members, LayerLimitExceeded, limits=UnpackLimits(max_bytes=4000))
    assert isinstance(exc, LayerLimitExceeded) and exc.member in ("big", "(archive)")


def test_gzip_bomb_stops_at_limit(arena: Arena) -> None:
    write_tar(arena.blob, [f("zeros", bytes(8 << 20))], compress=True)
    assert arena.blob.stat().st_size < 100_000
    before = arena.snapshot()
    with pytest.raises(LayerLimitExceeded):
        unpack_layer(arena.blob, TAR_GZ, arena.dest, limits=UnpackLimits(max_bytes=1 << 20))
    assert arena.snapshot() == before


def test_nul_in_pax_path(arena: Arena) -> None:
    arena.refuse([f("ok", pax={"path": "a\x00b"})], match="NUL")


def test_unsupported_aufs_metadata(arena: Arena) -> None:
    arena.refuse([f(".wh..wh.plnk/1.2")], match="aufs")
    arena.refuse([f("a/.wh..wh.aufs")], match="aufs")


@needs_root
def test_meaningless_whiteout(arena: Arena) -> None:
    arena.refuse([f("a/.wh..")], match="meaningless")


def test_replacing_non_empty_directory(arena: Arena) -> None:
    arena.refuse([d("a"), f("a/x"), f("a")], match="non-empty directory")


def test_parent_is_a_file(arena: Arena) -> None:
    arena.refuse([f("a"), f("a/b")], match="'a' is not a directory")


# --------------------------------------------------------------------------- bad blobs


def test_corrupt_archive(arena: Arena) -> None:
    arena.blob.write_bytes(b"this is not a tar archive" * 40)
    with pytest.raises(CorruptLayer, match="not a valid tar"):
        unpack_layer(arena.blob, TAR, arena.dest)
    assert not arena.dest.exists()


def test_truncated_gzip(arena: Arena) -> None:
    write_tar(arena.blob, [f("a", os.urandom(100_000))], compress=True)
    arena.blob.write_bytes(arena.blob.read_bytes()[:50_000])
    before = arena.snapshot()
    with pytest.raises(CorruptLayer):
        unpack_layer(arena.blob, TAR_GZ, arena.dest)
    assert arena.snapshot() == before


def test_unknown_media_type(arena: Arena) -> None:
    write_tar(arena.blob, [f("a")])
    with pytest.raises(UnsupportedLayer, match="not a tar layer"):
        unpack_layer(arena.blob, "application/vnd.oci.image.config.v1+json", arena.dest)


def test_zstd_without_module(arena: Arena) -> None:
    try:
        import zstandard  # type: ignore[import-not-found]  # noqa: F401

        pytest.skip("zstandard is installed here: the missing-module error cannot happen")
    except ImportError:
        pass
    arena.blob.write_bytes(b"\x28\xb5\x2f\xfd" + bytes(100))
    with pytest.raises(UnsupportedLayer, match="zstandard"):
        unpack_layer(arena.blob, TAR + "+zstd", arena.dest)
    assert not arena.dest.exists()


def test_digest_mismatch_leaves_nothing(arena: Arena) -> None:
    write_tar(arena.blob, [f("a")])
    before = arena.snapshot()
    with pytest.raises(LayerDigestMismatch, match="pull it again"):
        unpack_layer(arena.blob, TAR, arena.dest, verify_digest="sha256:" + "0" * 64)
    assert arena.snapshot() == before


def test_digest_verified(arena: Arena) -> None:
    write_tar(arena.blob, [f("a"), f("b", os.urandom(3000))], compress=True)
    digest = "sha256:" + hashlib.sha256(arena.blob.read_bytes()).hexdigest()
    stats = unpack_layer(arena.blob, TAR_GZ, arena.dest, verify_digest=digest)
    assert stats.archive_bytes == arena.blob.stat().st_size


def test_destination_must_not_exist(arena: Arena) -> None:
    write_tar(arena.blob, [f("a")])
    arena.dest.mkdir()
    with pytest.raises(AlreadyExists):
        unpack_layer(arena.blob, TAR, arena.dest)


def test_whiteouts_need_root(arena: Arena, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(unpack, "_running_as_root", lambda: False)
    exc = arena.refuse([d("etc"), f("etc/.wh.motd", b"")], WhiteoutNeedsRoot, match="as root")
    assert isinstance(exc, WhiteoutNeedsRoot) and exc.member == "etc/.wh.motd"
    arena.refuse([d("etc"), f("etc/.wh..wh..opq", b"")], WhiteoutNeedsRoot)


# --------------------------------------------------------------------------- normal layers


def test_normal_layer(arena: Arena) -> None:
    members = [
        d("./", mode=0o755, mtime=1_500_000_000),
        d("bin", mtime=1_500_000_001),
        f("bin/busybox", b"\x7fELF...", mode=0o755, uid=0, mtime=1_500_000_002),
        sym("bin/sh", "/bin/busybox"),
        sym("bin/ls", "busybox"),
        sym("dangling", "/nonexistent/target"),
        d("etc", mode=0o750, uid=1234, gid=4321, mtime=1_500_000_003),
        f("etc/passwd", b"root:x:0:0::/root:/bin/sh\n", mode=0o600, uid=1234, gid=4321),
        hard("etc/passwd-", "etc/passwd"),
        hard("./etc/passwd.link", "./etc/passwd"),
        f("tmp/implicit/parent", b"p"),
        f("over", b"first"),
        f("over", b"second"),
        d("sticky", mode=0o1777),
    ]
    write_tar(arena.blob, members, compress=True)
    stats = unpack_layer(arena.blob, TAR_GZ, arena.dest)
    root = arena.dest

    assert stats.entries == len(members)
    assert (stats.files, stats.symlinks, stats.hardlinks) == (5, 3, 2)
    assert stats.compression == "gzip"
    assert stats.content_bytes == sum(len(m.data) for m in members)

    assert os.readlink(root / "bin/sh") == "/bin/busybox"  # stored as-is, never resolved
    assert os.readlink(root / "bin/ls") == "busybox"
    assert os.readlink(root / "dangling") == "/nonexistent/target"
    assert (root / "bin/busybox").read_bytes() == b"\x7fELF..."
    assert stat.S_IMODE((root / "bin/busybox").stat().st_mode) == 0o755
    assert (root / "bin/busybox").stat().st_mtime == 1_500_000_002
    passwd = (root / "etc/passwd").stat()
    assert passwd.st_ino == (root / "etc/passwd-").stat().st_ino
    assert passwd.st_ino == (root / "etc/passwd.link").stat().st_ino
    assert passwd.st_nlink == 3
    assert stat.S_IMODE(passwd.st_mode) == 0o600
    assert (root / "over").read_bytes() == b"second"
    assert (root / "tmp/implicit/parent").read_bytes() == b"p"
    assert stat.S_IMODE((root / "tmp").stat().st_mode) == 0o755
    assert stat.S_IMODE((root / "sticky").stat().st_mode) == 0o1777
    etc = (root / "etc").stat()
    assert stat.S_IMODE(etc.st_mode) == 0o750
    assert etc.st_mtime == 1_500_000_003  # directory mtimes survive files written into them
    assert (root / "bin").stat().st_mtime == 1_500_000_001
    assert root.stat().st_mtime == 1_500_000_000
    if IS_ROOT:
        assert (etc.st_uid, etc.st_gid) == (1234, 4321)
        assert (passwd.st_uid, passwd.st_gid) == (1234, 4321)
    assert sorted(os.listdir(arena.base)) == ["layer", "outside", "sentinel.txt"]


def test_plain_tar_and_docker_media_type(arena: Arena) -> None:
    write_tar(arena.blob, [f("a", b"A")])
    stats = unpack_layer(
        arena.blob, "application/vnd.docker.image.rootfs.diff.tar.gzip", arena.dest
    )
    assert stats.compression == "none"  # the bytes decide, not the media type
    assert (arena.dest / "a").read_bytes() == b"A"


def test_empty_tar(arena: Arena) -> None:
    write_tar(arena.blob, [])
    stats = unpack_layer(arena.blob, TAR, arena.dest)
    assert stats.entries == 0 and arena.dest.is_dir()


def test_symlink_replaced_by_file_is_not_followed(arena: Arena) -> None:
    write_tar(arena.blob, [sym("x", str(arena.sentinel)), f("x", b"mine")])
    unpack_layer(arena.blob, TAR, arena.dest)
    assert (arena.dest / "x").read_bytes() == b"mine"
    assert not (arena.dest / "x").is_symlink()
    assert arena.sentinel.read_text() == "keep"


@needs_root
def test_whiteouts_and_opaque_dirs(arena: Arena) -> None:
    members = [
        d("etc"),
        f("etc/.wh.motd", b""),
        d("var/cache"),
        f("var/cache/.wh..wh..opq", b""),
        f("var/cache/fresh", b"new"),
        f(".wh.gone-dir", b""),
    ]
    write_tar(arena.blob, members)
    stats = unpack_layer(arena.blob, TAR, arena.dest)
    assert (stats.whiteouts, stats.opaque_dirs) == (2, 1)
    for path in ("etc/motd", "gone-dir"):
        st = (arena.dest / path).lstat()
        assert stat.S_ISCHR(st.st_mode), path
        assert st.st_rdev == os.makedev(0, 0)
    assert not (arena.dest / "etc/.wh.motd").exists()
    assert not (arena.dest / "var/cache/.wh..wh..opq").exists()
    assert os.getxattr(arena.dest / "var/cache", "trusted.overlay.opaque") == b"y"
    assert (arena.dest / "var/cache/fresh").read_bytes() == b"new"
