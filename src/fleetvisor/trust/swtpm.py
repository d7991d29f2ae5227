"""A software TPM (swtpm) started and owned by its caller, for hosts without a TPM chip.

    Swtpm.start(root)  ->  root/state/ (persistent: EK, AK, NV survive restarts)
                           root/swtpm.log, root/swtpm.pid
                           TCP 127.0.0.1:P (TPM commands), P+1 (control channel)
    .tcti              ->  "swtpm:host=127.0.0.1,port=P" for tpm2-tools
    .stop()            ->  control-channel shutdown, then SIGTERM, then SIGKILL, by PID

Every start is a fresh TPM power cycle (`startup-clear`): PCRs are back at zero, as
after a machine reboot, while persistent objects and NV indexes stay. The process gets
SIGTERM if its parent dies (PR_SET_PDEATHSIG), and a leftover swtpm from a crashed
owner is recognised by its pid file and stopped before a new one is started.

swtpm keeps its state in ordinary files: root on the host can read its keys. It
exercises the protocol end to end; it is not tamper-resistant (see README).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType

from fleetvisor.trust.errors import SwtpmError, ToolsMissing

HOST = "127.0.0.1"
CMD_GET_CAPABILITY = 0x01
CMD_SHUTDOWN = 0x03
# TPM2_Shutdown(SU_CLEAR): tag TPM_ST_NO_SESSIONS, size 12, TPM_CC_Shutdown, SU_CLEAR.
TPM2_SHUTDOWN_CLEAR = struct.pack(">HIIH", 0x8001, 12, 0x0145, 0x0000)
_PR_SET_PDEATHSIG = 1


def missing_swtpm() -> str | None:
    """None when swtpm is installed, else what to install."""
    if shutil.which("swtpm") is None:
        return "swtpm not found: apt-get install -y swtpm swtpm-tools"
    return None


class Swtpm:
    """One running swtpm process. Create with `Swtpm.start(root)`; stop with `stop()`."""

    def __init__(self, root: Path, process: subprocess.Popen[bytes], port: int) -> None:
        self.root = root
        self.process = process
        self.port = port
        self.ctrl_port = port + 1

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def tcti(self) -> str:
        """The TCTI string tpm2-tools use to reach this TPM."""
        return f"swtpm:host={HOST},port={self.port}"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @classmethod
    def start(cls, root: Path, *, ready_timeout: float = 5.0, attempts: int = 5) -> Swtpm:
        """Start a swtpm keeping its state under `root`, on free ports; return once it
        answers on its control channel. Retries on a port taken in the meantime."""
        problem = missing_swtpm()
        if problem:
            raise ToolsMissing(problem)
        root.mkdir(parents=True, exist_ok=True)
        (root / "state").mkdir(mode=0o700, exist_ok=True)
        _stop_leftover(root)
        last_error = ""
        for _ in range(attempts):
            port = _free_port_pair()
            process = _spawn(root, port)
            try:
                if _wait_ready(process, port + 1, ready_timeout):
                    (root / "swtpm.pid").write_text(f"{process.pid}\n")
                    return cls(root, process, port)
            except BaseException:
                _terminate(process)
                raise
            last_error = _log_tail(root)
            _terminate(process)
            if "in use" not in last_error.lower() and "bind" not in last_error.lower():
                break
        raise SwtpmError(
            f"swtpm did not become ready under {root}: {last_error or 'no output'}; "
            "check that the state directory is not used by another swtpm"
        )

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 3.0) -> None:
        """Shut down cleanly (state saved), else by signals, by PID.

        First TPM2_Shutdown: without it the power-off is "disorderly", and a TPM counts
        each disorderly power-off after a key was used as a dictionary-attack failure;
        a few of those lock the attestation key out (TPM_RC_LOCKOUT) for minutes."""
        if self.running():
            with contextlib.suppress(OSError):
                _send(self.port, TPM2_SHUTDOWN_CLEAR, timeout=1.0)
            with contextlib.suppress(OSError):
                _ctrl(self.ctrl_port, CMD_SHUTDOWN, timeout=1.0)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                _terminate(self.process, timeout)
        with contextlib.suppress(FileNotFoundError):
            (self.root / "swtpm.pid").unlink()

    def __enter__(self) -> Swtpm:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def _spawn(root: Path, port: int) -> subprocess.Popen[bytes]:
    args = [
        "swtpm",
        "socket",
        "--tpm2",
        "--tpmstate",
        f"dir={root / 'state'}",
        "--server",
        f"type=tcp,port={port},bindaddr={HOST}",
        "--ctrl",
        f"type=tcp,port={port + 1},bindaddr={HOST}",
        "--flags",
        "not-need-init,startup-clear",
    ]
    log = open(root / "swtpm.log", "ab")  # noqa: SIM115 - handed to the child, closed below
    try:
        return subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C to the agent must not kill its TPM first
            # PDEATHSIG fires when the forking *thread* ends: only safe from the main thread.
            preexec_fn=_die_with_parent
            if threading.current_thread() is threading.main_thread()
            else None,
        )
    finally:
        log.close()


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the owner dies, so no swtpm outlives it."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _free_port_pair() -> int:
    """A port P on 127.0.0.1 such that P and P+1 are both free right now."""
    for _ in range(100):
        with socket.socket() as first:
            first.bind((HOST, 0))
            port = int(first.getsockname()[1])
            if port >= 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind((HOST, port + 1))
                except OSError:
                    continue
                return port
    raise SwtpmError("no two consecutive free TCP ports on 127.0.0.1 for swtpm")


def _ctrl(port: int, command: int, timeout: float) -> bytes:
    """Send one control-channel command; its response (result code first)."""
    return _send(port, struct.pack(">I", command), timeout)


def _send(port: int, data: bytes, timeout: float) -> bytes:
    """Send raw bytes to one of swtpm's ports; the first response chunk."""
    with socket.create_connection((HOST, port), timeout=timeout) as conn:
        conn.sendall(data)
        return conn.recv(64)


def _wait_ready(process: subprocess.Popen[bytes], ctrl_port: int, timeout: float) -> bool:
    """True once the control channel answers GET_CAPABILITY with success; False if the
    process exits first. Real time on purpose: this waits for a real process."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        with contextlib.suppress(OSError):
            answer = _ctrl(ctrl_port, CMD_GET_CAPABILITY, timeout=0.5)
            if len(answer) >= 4 and answer[:4] == b"\0\0\0\0":
                return True
        time.sleep(0.005)
    raise SwtpmError(f"swtpm (pid {process.pid}) did not answer within {timeout:g} s")


def _terminate(process: subprocess.Popen[bytes], timeout: float = 3.0) -> None:
    """SIGTERM, then SIGKILL, the given child by PID; reap it."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)


def _stop_leftover(root: Path) -> None:
    """Stop a swtpm left running on this state dir by an owner that crashed."""
    pid_file = root / "swtpm.pid"
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ValueError, ProcessLookupError):
        pid_file.unlink(missing_ok=True)
        return
    if cmdline and cmdline[0].endswith(b"swtpm") and f"dir={root / 'state'}".encode() in cmdline:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 3.0
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)


def _log_tail(root: Path, lines: int = 5) -> str:
    try:
        text = (root / "swtpm.log").read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return " | ".join(text.strip().splitlines()[-lines:])
