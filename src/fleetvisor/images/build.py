"""Build small, real OCI images as image-layout directories, so tests and benchmarks never
pull from a public registry.

`build_busybox_image` makes a busybox rootfs (from Debian's busybox-static) plus optional
extra layers; `build_rootfs_image` packs any directory (e.g. `debootstrap_minbase`'s tree)
as one layer; `build_httpwork_image` adds `/bin/httpwork` (workloads/httpwork.c, compiled
here once) to the busybox base, `build_memcounter_image` likewise `/bin/memcounter`.
Layers are deterministic (sorted, fixed mtimes, gzip without timestamp), so building the
same image twice gives the same digests and the host cache shares them.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import os
import platform
import re
import secrets
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Literal, cast

from fleetvisor.errors import NotFound

MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SOURCE_DATE_EPOCH = 1_700_000_000  # every generated member's mtime: reproducible digests

EntryKind = Literal["file", "dir", "symlink", "hardlink", "whiteout", "opaque"]


class RootfsBuildError(RuntimeError):
    """A base tree could not be built here (no root, no network, no tool): callers skip."""


class WorkloadBuildError(RuntimeError):
    """A workload binary could not be compiled. `missing_packages` names the Debian packages
    to install when a tool is missing (callers may skip then); empty means a real failure."""

    def __init__(self, message: str, missing_packages: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.missing_packages = tuple(missing_packages)


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Entry:
    """One member of a generated layer; use the constructors (Entry.file, Entry.whiteout...)."""

    path: str
    kind: EntryKind
    data: bytes = b""
    mode: int = 0o644
    target: str = ""
    uid: int = 0
    gid: int = 0

    @classmethod
    def file(cls, path: str, data: bytes | str, mode: int = 0o644) -> Entry:
        return cls(path, "file", data.encode() if isinstance(data, str) else data, mode)

    @classmethod
    def dir(cls, path: str, mode: int = 0o755) -> Entry:
        return cls(path, "dir", mode=mode)

    @classmethod
    def symlink(cls, path: str, target: str) -> Entry:
        return cls(path, "symlink", mode=0o777, target=target)

    @classmethod
    def hardlink(cls, path: str, target: str) -> Entry:
        return cls(path, "hardlink", target=target)

    @classmethod
    def whiteout(cls, path: str) -> Entry:
        """Delete `path` of the layers below (OCI `.wh.NAME`)."""
        return cls(path, "whiteout")

    @classmethod
    def opaque(cls, directory: str) -> Entry:
        """Hide everything the layers below have in `directory` (OCI `.wh..wh..opq`)."""
        return cls(directory, "opaque")


@dataclass(frozen=True)
class LayerDescriptor:
    """A layer blob written to the layout: compressed digest and size, uncompressed diff_id."""

    digest: str
    size: int
    diff_id: str
    media_type: str = MEDIA_LAYER_GZIP
    comment: str = ""


@dataclass(frozen=True)
class BuiltImage:
    """One tagged image of a layout, read back (what tests hand to the layer cache)."""

    layout: Path
    tag: str
    manifest_digest: str
    config_digest: str
    layers: tuple[LayerDescriptor, ...]
    config: dict[str, Any] = field(default_factory=dict)

    def blob_path(self, digest: str) -> Path:
        return layout_blob_path(self.layout, digest)


# --------------------------------------------------------------------------- layout writing


class _HashingWriter:
    """A write-only stream that hashes and counts what passes through to `sink`."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink
        self.hasher = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hasher.update(data)
        self.size += len(data)
        self.sink.write(data)
        return len(data)

    def flush(self) -> None:
        self.sink.flush()

    @property
    def digest(self) -> str:
        return "sha256:" + self.hasher.hexdigest()


def layout_blob_path(layout: Path, digest: str) -> Path:
    """Where an OCI image layout keeps blob `digest`."""
    algorithm, _, hexpart = digest.partition(":")
    return Path(layout) / "blobs" / algorithm / hexpart


def _init_layout(layout: Path) -> None:
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    marker = layout / "oci-layout"
    if not marker.exists():
        marker.write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))


def _write_json_blob(layout: Path, document: dict[str, Any]) -> tuple[str, int]:
    data = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = layout_blob_path(layout, digest)
    if not path.exists():
        _atomic_write(path, data)
    return digest, len(data)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class _LayerWriter:
    """A deterministic gzip tar stream into the layout; `descriptor` is set once it closes."""

    def __init__(self, layout: Path, comment: str, compresslevel: int = 6) -> None:
        _init_layout(layout)
        self.compresslevel = compresslevel
        self.layout = layout
        self.comment = comment
        self.tmp = layout / "blobs" / "sha256" / f".layer-{secrets.token_hex(4)}"
        self._stack = contextlib.ExitStack()
        self.descriptor: LayerDescriptor | None = None

    def __enter__(self) -> tarfile.TarFile:
        raw = self._stack.enter_context(open(self.tmp, "wb"))
        self._compressed = _HashingWriter(raw)
        gz = self._stack.enter_context(
            gzip.GzipFile(
                filename="",
                mode="wb",
                fileobj=cast(Any, self._compressed),
                mtime=0,
                compresslevel=self.compresslevel,
            )
        )
        self._plain = _HashingWriter(gz)
        return self._stack.enter_context(
            tarfile.open(fileobj=cast(Any, self._plain), mode="w|", format=tarfile.PAX_FORMAT)
        )

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            self._stack.close()  # tar end blocks, gzip trailer, file close: in that order
            if exc_type is None:
                self.descriptor = LayerDescriptor(
                    self._compressed.digest,
                    self._compressed.size,
                    self._plain.digest,
                    MEDIA_LAYER_GZIP,
                    self.comment,
                )
                os.replace(self.tmp, layout_blob_path(self.layout, self.descriptor.digest))
        finally:
            with contextlib.suppress(FileNotFoundError):
                self.tmp.unlink()


def _tarinfo(entry: Entry) -> tuple[tarfile.TarInfo, BinaryIO | None]:
    path = entry.path.strip("/")
    head, _, name = path.rpartition("/")
    kind_map = {
        "file": tarfile.REGTYPE,
        "dir": tarfile.DIRTYPE,
        "symlink": tarfile.SYMTYPE,
        "hardlink": tarfile.LNKTYPE,
    }
    if entry.kind == "whiteout":
        info = tarfile.TarInfo(f"{head}/.wh.{name}" if head else f".wh.{name}")
    elif entry.kind == "opaque":
        info = tarfile.TarInfo(f"{path}/.wh..wh..opq" if path else ".wh..wh..opq")
    else:
        info = tarfile.TarInfo(path)
        info.type = kind_map[entry.kind]
        info.linkname = entry.target.lstrip("/") if entry.kind == "hardlink" else entry.target
    info.mode = entry.mode if entry.kind not in ("whiteout", "opaque") else 0o644
    info.uid, info.gid, info.mtime = entry.uid, entry.gid, SOURCE_DATE_EPOCH
    if entry.kind == "file":
        info.size = len(entry.data)
        return info, io.BytesIO(entry.data)
    return info, None


def write_layer(
    layout: Path,
    entries: Iterable[Entry],
    comment: str = "",
    *,
    dir_modes: Mapping[str, int] | None = None,
    compresslevel: int = 6,
) -> LayerDescriptor:
    """Write a gzip layer holding `entries`, in order, adding missing parent directories.

    An added parent takes its mode from `dir_modes` (the lower layers' directories, e.g.
    {"tmp": 0o1777}), else 0755: in overlayfs the topmost copy of a directory decides.
    """
    modes = dir_modes or {}
    seen_dirs: set[str] = set()
    ordered: list[Entry] = []
    for entry in entries:
        parts = entry.path.strip("/").split("/")
        limit = len(parts) if entry.kind == "opaque" else len(parts) - 1
        for depth in range(1, limit + 1):
            parent = "/".join(parts[:depth])
            if parent and parent not in seen_dirs:
                seen_dirs.add(parent)
                ordered.append(Entry.dir(parent, modes.get(parent, 0o755)))
        if entry.kind == "dir":
            seen_dirs.add(entry.path.strip("/"))
        ordered.append(entry)
    writer = _LayerWriter(Path(layout), comment, compresslevel)
    with writer as tar:
        for entry in ordered:
            info, data = _tarinfo(entry)
            tar.addfile(info, data)
    assert writer.descriptor is not None
    return writer.descriptor


def write_rootfs_layer(
    layout: Path, rootfs: Path, comment: str = "", *, compresslevel: int = 6
) -> LayerDescriptor:
    """Pack directory `rootfs` as one gzip layer: numeric owners kept, hard links kept,
    device nodes, fifos and sockets skipped (the runtime provides /dev)."""
    rootfs = Path(rootfs)
    if not rootfs.is_dir():
        raise NotFound(f"rootfs directory {rootfs} does not exist")

    def normalize(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        if info.ischr() or info.isblk() or info.isfifo():
            return None
        info.uname = info.gname = ""
        return info

    writer = _LayerWriter(Path(layout), comment or f"rootfs {rootfs.name}", compresslevel)
    with writer as tar:
        tar.add(str(rootfs), arcname=".", recursive=False, filter=normalize)
        for dirpath, dirnames, filenames in os.walk(rootfs):
            dirnames.sort()
            for name in sorted(dirnames + filenames):
                full = os.path.join(dirpath, name)
                if stat.S_ISSOCK(os.lstat(full).st_mode):
                    continue
                arcname = os.path.relpath(full, rootfs)
                tar.add(full, arcname=arcname, recursive=False, filter=normalize)
    assert writer.descriptor is not None
    return writer.descriptor


def _oci_architecture() -> str:
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(machine, machine)


def write_image(
    layout: Path,
    layers: Sequence[LayerDescriptor],
    *,
    tag: str = "latest",
    cmd: Sequence[str] = ("sh",),
    env: Sequence[str] = (DEFAULT_PATH,),
    entrypoint: Sequence[str] | None = None,
    working_dir: str = "/",
    labels: dict[str, str] | None = None,
    exposed_ports: Sequence[str] = (),
) -> str:
    """Write config + manifest for `layers` (base first) and tag it in index.json; returns
    the manifest digest. An existing image with the same tag is replaced in the index."""
    layout = Path(layout)
    _init_layout(layout)
    created = datetime.fromtimestamp(SOURCE_DATE_EPOCH, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    image_config: dict[str, Any] = {"Env": list(env), "Cmd": list(cmd), "WorkingDir": working_dir}
    if entrypoint is not None:
        image_config["Entrypoint"] = list(entrypoint)
    if labels:
        image_config["Labels"] = dict(labels)
    if exposed_ports:
        image_config["ExposedPorts"] = {port: {} for port in exposed_ports}
    config = {
        "created": created,
        "architecture": _oci_architecture(),
        "os": "linux",
        "config": image_config,
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [
            {"created": created, "created_by": layer.comment or "fleetvisor.images.build"}
            for layer in layers
        ],
    }
    config_digest, config_size = _write_json_blob(layout, config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": config_digest, "size": config_size},
        "layers": [
            {"mediaType": layer.media_type, "digest": layer.digest, "size": layer.size}
            for layer in layers
        ],
    }
    manifest_digest, manifest_size = _write_json_blob(layout, manifest)
    index_path = layout / "index.json"
    index: dict[str, Any] = (
        json.loads(index_path.read_text())
        if index_path.exists()
        else {"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": []}
    )
    index["manifests"] = [
        m for m in index["manifests"] if m.get("annotations", {}).get(REF_NAME) != tag
    ]
    index["manifests"].append(
        {
            "mediaType": MEDIA_MANIFEST,
            "digest": manifest_digest,
            "size": manifest_size,
            "annotations": {REF_NAME: tag},
            "platform": {"architecture": _oci_architecture(), "os": "linux"},
        }
    )
    _atomic_write(index_path, json.dumps(index, indent=2).encode())
    return manifest_digest


def read_image(layout: Path, tag: str = "latest") -> BuiltImage:
    """Read back the image tagged `tag` in an OCI layout (manifest, config, layers)."""
    layout = Path(layout)
    try:
        index = json.loads((layout / "index.json").read_text())
    except FileNotFoundError:
        raise NotFound(f"{layout} is not an OCI image layout (no index.json)") from None
    for entry in index.get("manifests", []):
        if entry.get("annotations", {}).get(REF_NAME) == tag:
            manifest = json.loads(layout_blob_path(layout, entry["digest"]).read_text())
            config_digest = manifest["config"]["digest"]
            config = json.loads(layout_blob_path(layout, config_digest).read_text())
            diff_ids = config.get("rootfs", {}).get("diff_ids", [])
            layers = tuple(
                LayerDescriptor(
                    m["digest"], m["size"], diff_ids[i] if i < len(diff_ids) else "", m["mediaType"]
                )
                for i, m in enumerate(manifest["layers"])
            )
            return BuiltImage(layout, tag, entry["digest"], config_digest, layers, config)
    raise NotFound(f"no image tagged {tag!r} in {layout}; tags: {_tags(index)}")


def _tags(index: dict[str, Any]) -> list[str]:
    return [
        m["annotations"][REF_NAME]
        for m in index.get("manifests", [])
        if REF_NAME in m.get("annotations", {})
    ]


# --------------------------------------------------------------------------- busybox


def busybox_applets(busybox: Path = Path("/bin/busybox")) -> list[str]:
    """The applet names `busybox --list` prints (each becomes a symlink in /bin)."""
    if not os.access(busybox, os.X_OK):
        raise RootfsBuildError(f"{busybox} is missing; install Debian's busybox-static")
    out = subprocess.run(
        [str(busybox), "--list"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    return sorted({name for name in out.split() if name and name != "busybox" and "/" not in name})


def busybox_rootfs_entries(busybox: Path = Path("/bin/busybox")) -> list[Entry]:
    """A minimal busybox root filesystem: /bin/busybox, applet symlinks, users, FHS dirs."""
    entries = [Entry.dir(d) for d in ("bin", "dev", "etc", "home", "proc", "sys", "usr", "var")]
    entries += [Entry.dir("root", 0o700), Entry.dir("tmp", 0o1777), Entry.dir("usr/bin")]
    entries.append(Entry.file("bin/busybox", Path(busybox).read_bytes(), 0o755))
    entries += [Entry.symlink(f"bin/{name}", "/bin/busybox") for name in busybox_applets(busybox)]
    entries += [
        Entry.file(
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        ),
        Entry.file("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
        Entry.file("etc/motd", "fleetvisor busybox image\n"),
    ]
    return entries


def httpd_layer(port: int = 8080, page: str = "hello from fleetvisor\n") -> list[Entry]:
    """A second layer: a page in /www and /usr/local/bin/serve running busybox httpd on it."""
    script = f'#!/bin/sh\nexec httpd -f -v -p "${{PORT:-{port}}}" -h /www\n'
    return [
        Entry.file("www/index.html", page),
        Entry.file("usr/local/bin/serve", script, 0o755),
    ]


def build_busybox_image(
    out: Path,
    tag: str = "latest",
    extra_layers: Sequence[Sequence[Entry]] = (),
    *,
    busybox: Path = Path("/bin/busybox"),
    cmd: Sequence[str] = ("sh",),
) -> Path:
    """Write a busybox image (base layer + `extra_layers`, in order) into layout `out`."""
    out = Path(out)
    base = busybox_rootfs_entries(busybox)
    dir_modes = {e.path.strip("/"): e.mode for e in base if e.kind == "dir"}
    layers = [write_layer(out, base, "busybox base")]
    for number, entries in enumerate(extra_layers, 1):
        layers.append(write_layer(out, entries, f"extra layer {number}", dir_modes=dir_modes))
    write_image(out, layers, tag=tag, cmd=cmd)
    return out


# --------------------------------------------------------------------------- httpwork

HTTPWORK_SOURCE = Path(__file__).parent / "workloads" / "httpwork.c"
HTTPWORK_CFLAGS = ("-O2", "-static", "-Wall", "-Wextra")
_DEBIAN_BUILD_PACKAGES = ("gcc", "libc6-dev")
# what gcc and ld say without libc6-dev: no headers, no crt1.o, no libc.a
_NO_LIBC = re.compile(
    r"cannot find -lc\b|cannot find crt1\.o|fatal error: [\w/.-]+\.h: No such file"
)


def default_workload_cache() -> Path:
    """Where compiled workload binaries are kept between runs."""
    return Path.home() / ".cache" / "fleetvisor" / "workloads"


def compile_httpwork(
    cache_dir: Path | None = None,
    *,
    source: Path = HTTPWORK_SOURCE,
    compiler: str = "gcc",
    timeout: float = 300.0,
) -> Path:
    """The static httpwork binary, compiled once per source content (sha256 of the source,
    flags and machine) into `cache_dir`; later calls, also from other processes, reuse it.

    Raises WorkloadBuildError: with `missing_packages` when gcc or a static libc is missing.
    """
    return compile_workload("httpwork", source, cache_dir, compiler=compiler, timeout=timeout)


def compile_workload(
    name: str,
    source: Path,
    cache_dir: Path | None = None,
    *,
    compiler: str = "gcc",
    timeout: float = 300.0,
) -> Path:
    """Static binary `name` from C file `source`, compiled once per source content (sha256
    of the source, flags and machine) into `cache_dir`; later calls, also from other
    processes, reuse it. Raises WorkloadBuildError (see compile_httpwork)."""
    data = Path(source).read_bytes()
    key = hashlib.sha256(
        b"\0".join([data, " ".join(HTTPWORK_CFLAGS).encode(), platform.machine().encode()])
    ).hexdigest()
    cache = Path(cache_dir) if cache_dir is not None else default_workload_cache()
    cache.mkdir(parents=True, exist_ok=True)
    binary = cache / f"{name}-{key[:16]}"
    if os.access(binary, os.X_OK):
        return binary
    lock_fd = os.open(cache / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)  # one compiler per cache dir; others reuse it
        if os.access(binary, os.X_OK):
            return binary
        if shutil.which(compiler) is None:
            raise WorkloadBuildError(
                f"{compiler} is not installed: apt-get install gcc libc6-dev "
                f"({name} is compiled here as a static binary)",
                _DEBIAN_BUILD_PACKAGES,
            )
        tmp = cache / f".{name}-{key[:16]}.{secrets.token_hex(4)}"
        argv = [compiler, *HTTPWORK_CFLAGS, "-o", str(tmp), str(source)]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
            if proc.returncode != 0:
                output = proc.stdout + proc.stderr
                tail = "\n".join(output.strip().splitlines()[-8:])
                if _NO_LIBC.search(output):
                    raise WorkloadBuildError(
                        f"no static C library to link {name}: apt-get install libc6-dev "
                        f"(and gcc)\n{tail}",
                        ("libc6-dev",),
                    )
                raise WorkloadBuildError(
                    f"compiling {source} failed (exit {proc.returncode}): {' '.join(argv)}\n{tail}"
                )
            os.chmod(tmp, 0o755)
            os.replace(tmp, binary)
        except subprocess.TimeoutExpired:
            raise WorkloadBuildError(f"compiling {source} took over {timeout}s") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return binary
    finally:
        os.close(lock_fd)


def build_httpwork_image(
    out: Path,
    tag: str = "latest",
    *,
    busybox: Path = Path("/bin/busybox"),
    cache_dir: Path | None = None,
    source: Path = HTTPWORK_SOURCE,
    port: int = 8080,
    work_us: int = 10000,
) -> Path:
    """Write the httpwork image into layout `out`: the busybox base layer (the same digest
    as `build_busybox_image`'s, so host caches share it) plus a layer with /bin/httpwork.

    Runs `/bin/httpwork` (Entrypoint; Cmd empty) with PORT and WORK_US in Env, and
    exposes `port`/tcp. Raises WorkloadBuildError (no gcc or static libc) or
    RootfsBuildError (no busybox).
    """
    out = Path(out)
    if not os.access(busybox, os.X_OK):
        raise RootfsBuildError(f"{busybox} is missing; install Debian's busybox-static")
    binary = compile_httpwork(cache_dir, source=source)
    base = busybox_rootfs_entries(busybox)
    dir_modes = {e.path.strip("/"): e.mode for e in base if e.kind == "dir"}
    layers = [
        write_layer(out, base, "busybox base"),
        write_layer(
            out,
            [Entry.file("bin/httpwork", binary.read_bytes(), 0o755)],
            "httpwork (workloads/httpwork.c)",
            dir_modes=dir_modes,
        ),
    ]
    write_image(
        out,
        layers,
        tag=tag,
        entrypoint=("/bin/httpwork",),
        cmd=(),
        env=(DEFAULT_PATH, f"PORT={port}", f"WORK_US={work_us}"),
        exposed_ports=(f"{port}/tcp",),
    )
    return out


# --------------------------------------------------------------------------- memcounter

MEMCOUNTER_SOURCE = Path(__file__).parent / "workloads" / "memcounter.c"


def compile_memcounter(
    cache_dir: Path | None = None, *, source: Path = MEMCOUNTER_SOURCE, compiler: str = "gcc"
) -> Path:
    """The static memcounter binary (workloads/memcounter.c), compiled once and cached
    like httpwork's. Raises WorkloadBuildError."""
    return compile_workload("memcounter", source, cache_dir, compiler=compiler)


def build_memcounter_image(
    out: Path,
    tag: str = "latest",
    *,
    busybox: Path = Path("/bin/busybox"),
    cache_dir: Path | None = None,
    source: Path = MEMCOUNTER_SOURCE,
    mem_mb: int = 100,
    tick_ms: int = 100,
) -> Path:
    """Write the memcounter image into layout `out`: the busybox base layer (shared with
    `build_busybox_image`) plus /bin/memcounter, run as Entrypoint with MEM_MB and TICK_MS
    in Env. It holds MEM_MB of random data and counts in memory, writing /data/counter:
    a checkpoint/restore keeps the count, a cold restart begins at 1 again."""
    out = Path(out)
    if not os.access(busybox, os.X_OK):
        raise RootfsBuildError(f"{busybox} is missing; install Debian's busybox-static")
    binary = compile_memcounter(cache_dir, source=source)
    base = busybox_rootfs_entries(busybox)
    dir_modes = {e.path.strip("/"): e.mode for e in base if e.kind == "dir"}
    layers = [
        write_layer(out, base, "busybox base"),
        write_layer(
            out,
            [Entry.file("bin/memcounter", binary.read_bytes(), 0o755), Entry.dir("data")],
            "memcounter (workloads/memcounter.c)",
            dir_modes=dir_modes,
        ),
    ]
    write_image(
        out,
        layers,
        tag=tag,
        entrypoint=("/bin/memcounter",),
        cmd=(),
        env=(DEFAULT_PATH, f"MEM_MB={mem_mb}", f"TICK_MS={tick_ms}"),
    )
    return out


def build_rootfs_image(
    out: Path,
    rootfs_dir: Path,
    tag: str = "latest",
    *,
    cmd: Sequence[str] = ("/bin/sh",),
    env: Sequence[str] = (DEFAULT_PATH,),
    compresslevel: int = 6,
) -> Path:
    """Write an image of directory `rootfs_dir` (one gzip layer) into layout `out`.

    A Debian tree has setuid binaries (su, passwd): unpack it with allow_setuid=True.
    `compresslevel` 1 packs a 200 MB minbase tree about 2x faster than 6, 5% bigger.
    """
    out = Path(out)
    layer = write_rootfs_layer(out, Path(rootfs_dir), compresslevel=compresslevel)
    write_image(out, [layer], tag=tag, cmd=cmd, env=env)
    return out


# --------------------------------------------------------------------------- debootstrap


def apt_mirror(suite: str = "bookworm", etc_apt: Path = Path("/etc/apt")) -> str:
    """The Debian mirror apt already uses for `suite` (sources.list, *.list, deb822 *.sources)."""
    candidates: list[tuple[str, list[str]]] = []
    one_line = [etc_apt / "sources.list", *sorted((etc_apt / "sources.list.d").glob("*.list"))]
    for path in one_line:
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                words = re.sub(r"\[[^\]]*\]", " ", line.split("#", 1)[0]).split()
                if len(words) >= 3 and words[0] == "deb":
                    candidates.append((words[1], [words[2]]))
    for path in sorted((etc_apt / "sources.list.d").glob("*.sources")):
        with contextlib.suppress(OSError):
            for stanza in re.split(r"\n\s*\n", path.read_text()):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line:
                        continue
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.strip()
                if fields.get("enabled", "yes").lower() == "no":
                    continue
                if "deb" not in fields.get("types", "").split():
                    continue
                for uri in fields.get("uris", "").split():
                    candidates.append((uri, fields.get("suites", "").split()))
    for uri, suites in candidates:
        if suite in suites:
            return uri
    raise RootfsBuildError(
        f"no apt source for suite {suite!r} under {etc_apt}; pass mirror= explicitly"
    )


def _mounts_under(path: Path) -> list[str]:
    """Mount points at or below `path`, deepest first (from /proc/self/mountinfo)."""
    prefix = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo") as info:
        for line in info:
            point = re.sub(r"\\(\d{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def _remove_build_tree(path: Path) -> None:
    """Delete a (possibly failed) debootstrap tree, unmounting what it left mounted first:
    a bind-mounted /dev or /proc must never be deleted through."""
    for point in _mounts_under(path):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    if remaining := _mounts_under(path):
        raise RootfsBuildError(f"cannot remove {path}: still mounted at {remaining}")
    shutil.rmtree(path, ignore_errors=True)


def debootstrap_minbase(
    cache_dir: Path,
    *,
    suite: str = "bookworm",
    mirror: str | None = None,
    timeout: float = 1800.0,
) -> Path:
    """A `debootstrap --variant=minbase` tree of `suite`, built once and cached in `cache_dir`.

    Raises RootfsBuildError (not root, no debootstrap, mirror unreachable) so callers skip.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / f"{suite}-minbase"
    done = cache_dir / f"{suite}-minbase.done"
    lock_fd = os.open(cache_dir / f"{suite}-minbase.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)  # one builder per cache dir; others reuse its tree
        if done.exists() and target.is_dir():
            return target
        if os.geteuid() != 0:
            raise RootfsBuildError("debootstrap needs root; run as root or skip this image")
        if shutil.which("debootstrap") is None:
            raise RootfsBuildError("debootstrap is not installed (apt-get install debootstrap)")
        source = mirror or apt_mirror(suite)
        for stale in [*cache_dir.glob(f".{suite}-minbase.build-*"), target]:
            if os.path.lexists(stale):
                _remove_build_tree(stale)
        work = cache_dir / f".{suite}-minbase.build-{secrets.token_hex(4)}"
        argv = ["debootstrap", "--variant=minbase", suite, str(work), source]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            _remove_build_tree(work)
            raise RootfsBuildError(
                f"debootstrap of {suite} from {source} took over {timeout}s"
            ) from None
        if proc.returncode != 0:
            _remove_build_tree(work)
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
            raise RootfsBuildError(
                f"debootstrap of {suite} from {source} failed (exit {proc.returncode}); "
                f"check network access to the mirror:\n{tail}"
            )
        for point in _mounts_under(work):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)
        os.rename(work, target)
        done.write_text(f"{suite} from {source}\n")
        return target
    finally:
        os.close(lock_fd)
