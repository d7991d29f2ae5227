"""Real images end to end: build a busybox image, unpack its layers through the host
LayerCache, mount them as overlayfs lowerdirs and run a container on the result with runc."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetvisor.errors import NotFound
from fleetvisor.images.build import (
    REF_NAME,
    Entry,
    RootfsBuildError,
    apt_mirror,
    build_busybox_image,
    build_rootfs_image,
    debootstrap_minbase,
    httpd_layer,
    read_image,
)
from fleetvisor.images.layers import LayerCache


def _missing_parts() -> str | None:
    if not os.access("/bin/busybox", os.X_OK):
        return "/bin/busybox is missing (apt-get install busybox-static)"
    if os.geteuid() != 0:
        return "needs root (overlayfs mounts, whiteouts, runc)"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "the kernel has no overlayfs"
    for tool in ("runc", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


MISSING = _missing_parts()
needs_runtime = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")
needs_busybox = pytest.mark.skipif(
    not os.access("/bin/busybox", os.X_OK), reason="/bin/busybox is missing (busybox-static)"
)


@pytest.fixture
def prefix() -> str:
    """Unique name for this test's mounts and containers."""
    return f"fv-test-{secrets.token_hex(4)}"


@contextlib.contextmanager
def overlay(lowerdirs: str, base: Path) -> Iterator[tuple[Path, Path]]:
    """Mount overlayfs at base/merged with base/upper as upperdir; always unmounted."""
    merged, upper, work = base / "merged", base / "upper", base / "work"
    for d in (merged, upper, work):
        d.mkdir(parents=True)
    options = f"lowerdir={lowerdirs},upperdir={upper},workdir={work}"
    started = time.monotonic()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(merged)], check=True)
    print(f"overlay mount: {(time.monotonic() - started) * 1000:.1f} ms")
    try:
        yield merged, upper
    finally:
        if subprocess.run(["umount", str(merged)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(merged)], check=False)


def runc_run(rootfs: Path, base: Path, container_id: str, args: list[str]) -> str:
    """Run `args` in a runc container on `rootfs`; returns stdout. Always deletes it."""
    bundle, state = base / "bundle", base / "runc-state"
    bundle.mkdir()
    state.mkdir()
    subprocess.run(["runc", "spec", "--bundle", str(bundle)], check=True)
    config_path = bundle / "config.json"
    config = json.loads(config_path.read_text())
    config["root"] = {"path": str(rootfs), "readonly": False}
    config["process"]["args"] = args
    config["process"]["terminal"] = False
    config["hostname"] = container_id
    config_path.write_text(json.dumps(config, indent=2))
    runc = ["runc", "--root", str(state)]
    started = time.monotonic()
    try:
        result = subprocess.run(
            [*runc, "run", "--bundle", str(bundle), container_id],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
    finally:
        subprocess.run([*runc, "delete", "--force", container_id], capture_output=True)
    print(f"runc run: {(time.monotonic() - started) * 1000:.0f} ms")
    assert result.returncode == 0, f"runc run failed: {result.stderr}"
    return result.stdout


@needs_runtime
def test_busybox_layers_overlay_and_runc(tmp_path: Path, prefix: str) -> None:
    extra = [
        *httpd_layer(page="served by fleetvisor\n"),
        Entry.whiteout("etc/motd"),
        Entry.file("tmp/from-layer", "x"),  # its parent keeps the base layer's 1777
    ]
    layout = build_busybox_image(tmp_path / "layout", "v1", extra_layers=[extra])
    image = read_image(layout, "v1")
    assert len(image.layers) == 2
    cache = LayerCache(tmp_path / "cache")
    digests = [layer.digest for layer in image.layers]
    cache.acquire(prefix, digests)  # pin first, then pull
    try:
        for layer in image.layers:
            cache.ensure(layer.digest, image.blob_path, layer.media_type)
        base_dir = cache.path(digests[0])
        assert (base_dir / "etc/motd").read_text() == "fleetvisor busybox image\n"
        assert os.readlink(base_dir / "bin/sh") == "/bin/busybox"
        assert stat.S_ISCHR((cache.path(digests[1]) / "etc/motd").lstat().st_mode)

        lower = cache.overlay_lowerdirs(digests)
        assert lower.split(":") == [str(cache.path(digests[1])), str(base_dir)]
        with overlay(lower, tmp_path / prefix) as (merged, upper):
            # the whiteout in the upper image layer hides the base layer's file
            assert not os.path.lexists(merged / "etc/motd")
            assert (merged / "etc/passwd").read_text().startswith("root:x:0:0")
            assert (merged / "www/index.html").read_text() == "served by fleetvisor\n"
            assert os.readlink(merged / "bin/ls") == "/bin/busybox"
            assert stat.S_IMODE((merged / "tmp").stat().st_mode) == 0o1777
            # a delete in the container layer gets overlay's own whiteout format (ours matches)
            (merged / "etc/group").unlink()
            st = (upper / "etc/group").lstat()
            assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0)
            assert (base_dir / "etc/group").exists()  # the shared layer is never written

            out = runc_run(
                merged,
                tmp_path / prefix,
                prefix,
                [
                    "/bin/sh",
                    "-c",
                    "cat /www/index.html; "
                    "if [ -e /etc/motd ]; then echo motd-visible; else echo motd-hidden; fi; "
                    "echo user=$(id -u) host=$(hostname); echo written > /tmp/out",
                ],
            )
            assert "served by fleetvisor" in out
            assert "motd-hidden" in out
            assert f"user=0 host={prefix}" in out
            assert (upper / "tmp/out").read_text() == "written\n"  # writes land in upperdir
    finally:
        cache.release(prefix)
    snap = cache.snapshot()
    assert snap["misses"] == 2 and snap["layers_in_use"] == []


@needs_runtime
def test_opaque_directory_hides_lower_contents(tmp_path: Path, prefix: str) -> None:
    layers = [
        httpd_layer(page="old page\n"),
        [Entry.opaque("www"), Entry.file("www/new.html", "new page\n")],
    ]
    image = read_image(build_busybox_image(tmp_path / "layout", "op", extra_layers=layers), "op")
    cache = LayerCache(tmp_path / "cache")
    digests = [layer.digest for layer in image.layers]
    for layer in image.layers:
        cache.ensure(layer.digest, image.blob_path, layer.media_type)
    assert os.getxattr(cache.path(digests[2]) / "www", "trusted.overlay.opaque") == b"y"
    with overlay(cache.overlay_lowerdirs(digests), tmp_path / prefix) as (merged, _):
        assert sorted(os.listdir(merged / "www")) == ["new.html"]
        assert (merged / "usr/local/bin/serve").exists()  # other dirs of lower layers stay


@needs_busybox
def test_two_images_share_the_base_layer(tmp_path: Path) -> None:
    first = read_image(build_busybox_image(tmp_path / "layout", "a"), "a")
    second = read_image(
        build_busybox_image(tmp_path / "layout", "b", extra_layers=[httpd_layer()]), "b"
    )
    assert first.layers[0].digest == second.layers[0].digest  # reproducible base layer
    cache = LayerCache(tmp_path / "cache")
    started = time.monotonic()
    for image in (first, second):
        for layer in image.layers:
            cache.ensure(layer.digest, image.blob_path, layer.media_type)
    print(f"3 ensure() calls for 2 images: {(time.monotonic() - started) * 1000:.0f} ms")
    snap = cache.snapshot()
    assert (snap["misses"], snap["hits"]) == (2, 1)
    assert snap["bytes_saved"] == snap["layer_sizes"][first.layers[0].digest]
    if shutil.which("skopeo"):  # the layout is one other OCI tools read
        inspect = subprocess.run(
            ["skopeo", "inspect", f"oci:{tmp_path / 'layout'}:b"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert json.loads(inspect.stdout)["Layers"] == [layer.digest for layer in second.layers]


@pytest.mark.slow
@needs_runtime
def test_debootstrap_image_runs(tmp_path: Path, prefix: str) -> None:
    """A Debian minbase image end to end; the tree is cached (FLEETVISOR_ROOTFS_CACHE moves it)."""
    # Cached across runs (it takes about a minute to build): the suite's one slow build.
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fleetvisor"
    cache_dir = Path(os.environ.get("FLEETVISOR_ROOTFS_CACHE") or default / "rootfs")
    try:
        rootfs = debootstrap_minbase(cache_dir)
    except RootfsBuildError as exc:
        pytest.skip(f"cannot build a Debian tree here: {exc}")
    started = time.monotonic()
    layout = build_rootfs_image(tmp_path / "layout", rootfs, "bookworm", compresslevel=1)
    print(f"pack debian minbase: {time.monotonic() - started:.2f} s")
    image = read_image(layout, "bookworm")
    cache = LayerCache(tmp_path / "cache", allow_setuid=True)  # Debian ships setuid su/passwd
    layer = image.layers[0]
    started = time.monotonic()
    cache.ensure(layer.digest, image.blob_path, layer.media_type)
    print(f"unpack debian minbase: {time.monotonic() - started:.2f} s")
    assert cache.path(layer.digest).joinpath("usr/bin/su").stat().st_mode & stat.S_ISUID
    with overlay(cache.overlay_lowerdirs([layer.digest]), tmp_path / prefix) as (merged, _):
        out = runc_run(merged, tmp_path / prefix, prefix, ["/bin/cat", "/etc/debian_version"])
    assert out.strip().startswith("12")


@needs_busybox
def test_layout_tags_and_reproducible_digests(tmp_path: Path) -> None:
    layout = build_busybox_image(tmp_path / "layout", "v1")
    first = read_image(layout, "v1")
    build_busybox_image(tmp_path / "layout", "v1", extra_layers=[httpd_layer()])  # retag
    assert len(read_image(layout, "v1").layers) == 2
    again = read_image(build_busybox_image(tmp_path / "other", "v1"), "v1")
    assert again.manifest_digest == first.manifest_digest
    assert first.config["config"]["Cmd"] == ["sh"]
    assert any(e.startswith("PATH=") for e in first.config["config"]["Env"])
    index = json.loads((layout / "index.json").read_text())
    assert [m["annotations"][REF_NAME] for m in index["manifests"]] == ["v1"]
    with pytest.raises(NotFound, match="tags: \\['v1'\\]"):
        read_image(layout, "missing")


def test_apt_mirror_reads_one_line_and_deb822_sources(tmp_path: Path) -> None:
    etc = tmp_path / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    (etc / "sources.list").write_text(
        "# deb http://commented.example/debian bookworm main\n"
        "deb-src http://src.example/debian bookworm main\n"
        "deb [signed-by=/k.gpg arch=amd64] http://one-line.example/debian bullseye main\n"
    )
    (etc / "sources.list.d" / "a.sources").write_text(
        "Types: deb\nURIs: http://disabled.example/debian\nSuites: bookworm\nEnabled: no\n\n"
        "Types: deb deb-src\nURIs: http://deb822.example/debian\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n"
    )
    (etc / "sources.list.d" / "b.sources.disabled").write_text(
        "Types: deb\nURIs: http://ignored.example\nSuites: bookworm\n"
    )
    assert apt_mirror("bookworm", etc) == "http://deb822.example/debian"
    assert apt_mirror("bullseye", etc) == "http://one-line.example/debian"
    with pytest.raises(RootfsBuildError, match="mirror="):
        apt_mirror("trixie", etc)
