"""httpwork, the one-worker HTTP workload: compiled here (gcc, static), run directly on
the host on a free loopback port, and packed into an image. No root needed; skips, with
the reason, only when gcc or a static libc is missing."""

from __future__ import annotations

import os
import select
import signal
import socket
import struct
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

from fleetvisor.images.archive import import_image
from fleetvisor.images.build import (
    WorkloadBuildError,
    build_busybox_image,
    build_httpwork_image,
    compile_httpwork,
    read_image,
)
from fleetvisor.images.store import ImageStore


@pytest.fixture(scope="module")
def workload_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("workloads")


@pytest.fixture(scope="module")
def binary(workload_cache: Path) -> Path:
    try:
        return compile_httpwork(workload_cache)
    except WorkloadBuildError as exc:
        if exc.missing_packages:  # only a missing tool skips; a compile error fails
            pytest.skip(str(exc))
        raise


@contextmanager
def running(binary: Path, **env: str) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """httpwork on a free port (PORT=0, read back from its first log line); killed by
    PID on the way out if it still runs."""
    proc = subprocess.Popen(
        [str(binary)],
        env={"PORT": "0", **env},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        ready, _, _ = select.select([proc.stderr], [], [], 10.0)
        assert ready, "httpwork printed nothing in 10 s"
        line = proc.stderr.readline().decode()
        assert "listening on 0.0.0.0:" in line, line
        port = int(line.split("0.0.0.0:")[1].split()[0])
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        if proc.stderr is not None:
            proc.stderr.close()


@pytest.fixture
def server(binary: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    with running(binary, SERVED_BY="w-1", WORK_US="2000") as started:
        yield started


def exchange(port: int, data: bytes, timeout: float = 15.0) -> tuple[int, dict[str, str], bytes]:
    """Send `data` raw, read to EOF, parse: (status, headers lower-cased, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    version, status, _ = status_line.split(" ", 2)
    assert version == "HTTP/1.0"
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
    assert int(headers["content-length"]) == len(body)
    assert headers["connection"] == "close"
    return int(status), headers, body


def get(port: int, target: str) -> tuple[int, dict[str, str], bytes]:
    return exchange(port, f"GET {target} HTTP/1.0\r\nHost: x\r\n\r\n".encode())


def has_elf_interpreter(path: Path) -> bool:
    """Whether an ELF64 little-endian executable asks for a dynamic loader (PT_INTERP)."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    return any(struct.unpack_from("<I", data, phoff + i * phentsize)[0] == 3 for i in range(phnum))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


# --------------------------------------------------------------------------- compile


def test_compiled_once_per_source(binary: Path, workload_cache: Path, tmp_path: Path) -> None:
    assert os.access(binary, os.X_OK)
    mtime = binary.stat().st_mtime_ns
    assert compile_httpwork(workload_cache) == binary
    assert binary.stat().st_mtime_ns == mtime
    assert not has_elf_interpreter(binary)  # static: runs in an image without a libc
    broken = tmp_path / "broken.c"
    broken.write_text("int main(void) { return missing; }\n")
    with pytest.raises(WorkloadBuildError) as failed:
        compile_httpwork(tmp_path / "cache", source=broken)
    assert failed.value.missing_packages == () and "missing" in str(failed.value)


def test_missing_compiler_names_the_packages(tmp_path: Path) -> None:
    with pytest.raises(WorkloadBuildError) as failed:
        compile_httpwork(tmp_path, compiler="no-such-gcc-fv")
    assert failed.value.missing_packages == ("gcc", "libc6-dev")
    assert "apt-get install gcc libc6-dev" in str(failed.value)


# --------------------------------------------------------------------------- serving


def test_healthz_work_and_headers(server: tuple[subprocess.Popen[bytes], int]) -> None:
    _, port = server
    status, headers, body = get(port, "/healthz")
    assert (status, body, headers["x-served-by"]) == (200, b"ok\n", "w-1")
    status, headers, body = get(port, "/anything")
    assert (status, headers["x-served-by"]) == (200, "w-1")
    assert b"work_us=2000" in body  # WORK_US from the environment
    started = time.monotonic()
    status, _, body = get(port, "/x?a=1&work_us=50000&b")
    assert time.monotonic() - started >= 0.05  # 50 ms of CPU cannot take less wall time
    assert status == 200 and b"work_us=50000" in body
    # HTTP/1.1 and bare-LF heads are accepted; the answer is still HTTP/1.0, closed
    assert exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 200
    assert exchange(port, b"GET /healthz HTTP/1.0\n\n")[0] == 200


def test_bad_requests(server: tuple[subprocess.Popen[bytes], int]) -> None:
    proc, port = server
    for data in (
        b"GARBAGE\r\n\r\n",
        b"GET /\r\n\r\n",
        b"GET / HTTP/1.0 extra\r\n\r\n",
        b"GET nopath HTTP/1.0\r\n\r\n",
        b"GET / HTTP/1.0\r\nno colon here\r\n\r\n",
        b"GET / HTTP/1.0\r\nBad Name: x\r\n\r\n",
        b"GET /?work_us=abc HTTP/1.0\r\n\r\n",
        b"GET /?work_us= HTTP/1.0\r\n\r\n",
        b"GET /?work_us=-5 HTTP/1.0\r\n\r\n",
        b"GET / HTTP/1.0\r\nX: " + b"a" * 9000 + b"\r\n\r\n",  # head over 8 KiB
        b"\x00\x01\x02\r\n\r\n",
    ):
        status, headers, _ = exchange(port, data)
        assert status == 400, data[:40]
        assert headers["x-served-by"] == "w-1"
    for method in ("POST", "PUT", "DELETE", "HEAD"):
        status, headers, _ = exchange(port, f"{method} /healthz HTTP/1.0\r\n\r\n".encode())
        assert (status, headers["allow"]) == (405, "GET")
    assert get(port, "/healthz")[0] == 200 and proc.poll() is None


def test_clients_that_leave_early_do_not_hurt_it(
    server: tuple[subprocess.Popen[bytes], int],
) -> None:
    proc, port = server
    socket.create_connection(("127.0.0.1", port)).close()  # nothing sent
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /heal")  # half a request line, then gone
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /?work_us=100000 HTTP/1.0\r\n\r\n")  # gone before the answer
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /?work_us=20000 HTTP/1.0\r\n\r\n")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    # the last close sent RST: writing the answer to it fails (EPIPE/ECONNRESET), no SIGPIPE
    for _ in range(3):
        assert get(port, "/healthz")[0] == 200
    assert proc.poll() is None


@pytest.mark.slow
def test_a_silent_client_is_timed_out(server: tuple[subprocess.Popen[bytes], int]) -> None:
    _, port = server
    with socket.create_connection(("127.0.0.1", port), timeout=30) as silent:
        silent.sendall(b"GET / HTTP/1.0\r\n")  # no end of head, ever
        started = time.monotonic()
        with ThreadPoolExecutor(1) as pool:
            queued = pool.submit(get, port, "/healthz")  # waits behind the silent one
            answer = silent.recv(4096)
            assert answer.startswith(b"HTTP/1.0 408 ")
            assert time.monotonic() - started >= 4.0
            assert queued.result(timeout=30)[0] == 200


def test_hostname_is_the_default_name(binary: Path) -> None:
    with running(binary) as (_, port):
        assert get(port, "/healthz")[1]["x-served-by"] == socket.gethostname()[:255]


def test_one_request_at_a_time(server: tuple[subprocess.Popen[bytes], int]) -> None:
    _, port = server
    go = threading.Barrier(4)

    def one(_: int) -> int:
        go.wait()
        return get(port, "/?work_us=50000")[0]

    started = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(one, range(4)))
    elapsed = time.monotonic() - started
    assert statuses == [200] * 4
    # 4 x 50 ms of CPU, served one after the other; a parallel server could do it in 50 ms
    assert elapsed >= 0.19, f"4 requests took {elapsed:.3f}s: more than one served at once"


def test_sigterm_finishes_the_request_then_exits_0(binary: Path) -> None:
    with running(binary, SERVED_BY="w-2") as (proc, port), ThreadPoolExecutor(1) as pool:
        base = cpu_seconds(proc.pid)
        pending = pool.submit(get, port, "/?work_us=500000")
        deadline = time.monotonic() + 20
        while cpu_seconds(proc.pid) - base < 0.05:  # it is inside the request, burning
            assert time.monotonic() < deadline, "httpwork never started the request"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        status, headers, body = pending.result(timeout=30)
        assert (status, headers["x-served-by"]) == (200, "w-2") and b"work_us=500000" in body
        assert proc.wait(timeout=10) == 0
        assert proc.stderr is not None and b"stopping" in proc.stderr.read()
    with running(binary) as (proc, port):  # idle: SIGINT ends it at once
        assert get(port, "/healthz")[0] == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0


def test_bad_environment_is_refused(binary: Path) -> None:
    for env in ({"PORT": "http"}, {"PORT": "70000"}, {"WORK_US": "1ms"}):
        proc = subprocess.run([str(binary)], env=env, capture_output=True, timeout=10)
        assert proc.returncode == 2 and b"httpwork:" in proc.stderr


# --------------------------------------------------------------------------- image


def test_image(binary: Path, workload_cache: Path, tmp_path: Path) -> None:
    if not os.access("/bin/busybox", os.X_OK):
        pytest.skip("/bin/busybox is missing (apt-get install busybox-static)")
    layout = build_httpwork_image(tmp_path / "layout", "t", cache_dir=workload_cache)
    built = read_image(layout, "t")
    store = ImageStore(tmp_path / "store")
    info = import_image(store, layout, "httpwork:t")
    assert info.layers == 2
    config = store.image_config("httpwork:t")
    assert config["Entrypoint"] + config["Cmd"] == ["/bin/httpwork"]
    assert {"PORT=8080", "WORK_US=10000"} <= set(config["Env"])
    assert any(e.startswith("PATH=") for e in config["Env"])
    assert config["ExposedPorts"] == {"8080/tcp": {}}
    # the base layer is busybox's own, so a host cache holds it once for both images
    busybox = read_image(build_busybox_image(tmp_path / "busybox", "b"), "b")
    assert built.layers[0].digest == busybox.layers[0].digest
    with tarfile.open(built.blob_path(built.layers[1].digest)) as tar:
        member = tar.getmember("bin/httpwork")
        assert member.mode == 0o755 and member.uid == 0
        extracted = tar.extractfile(member)
        assert extracted is not None and extracted.read() == binary.read_bytes()
    again = read_image(build_httpwork_image(tmp_path / "again", "t", cache_dir=workload_cache), "t")
    assert again.manifest_digest == built.manifest_digest  # reproducible
