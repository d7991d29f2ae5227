"""Finding a CRIU that works here, and the runc command lines that use it.

Debian bookworm's criu 3.17 fails on recent kernels ("Unexpected rt vDSO area bounds",
fixed in 4.1; see PLATFORM.md), so only a CRIU reporting version >= 4.1 counts. Where to
look, first match wins:
  1. `$FLEETVISOR_CRIU` (when set, only that one),
  2. /usr/local/sbin/criu (where `scripts/deps/criu.sh` installs 4.1 built from source),
  3. `criu` on PATH.
The answer is cached per process (`find_criu`); `criu_missing_reason` says what to do
when there is none.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

ENV_VAR = "FLEETVISOR_CRIU"
DEFAULT_PATH = Path("/usr/local/sbin/criu")
MIN_VERSION = (4, 1)
INSTALL_HINT = (
    "run scripts/deps/criu.sh as root (builds CRIU >= 4.1 from Debian trixie's source into "
    "/usr/local/sbin/criu), or point FLEETVISOR_CRIU at a CRIU >= 4.1"
)
VERSION_TIMEOUT = 20.0
# CRIU reads the config file this environment variable names once, at start-up; runc's
# `criu swrk` inherits runc's environment. (The per-container RPC config file runc also
# offers, annotation org.criu.config, is parsed twice by CRIU 4.1: an `inherit-fd` in it
# is added twice and the restore fails with "Can't send fd 1 into store".)
CONFIG_ENV = "CRIU_CONFIG_FILE"
STDIO_KEYS_FILE = "fleetvisor-stdio.json"  # written next to the CRIU images
PR_SET_CHILD_SUBREAPER = 36

_VERSION = re.compile(r"^Version:\s*(\d+(?:\.\d+)*)", re.MULTILINE)


@dataclass(frozen=True)
class CriuInfo:
    """A CRIU binary that reported a usable version."""

    path: str
    version: tuple[int, ...]

    @property
    def version_text(self) -> str:
        return ".".join(str(part) for part in self.version)


def parse_version(text: str) -> tuple[int, ...] | None:
    """`criu --version` output ("Version: 4.1.1\\nGitID: ...") -> (4, 1, 1); None if absent."""
    match = _VERSION.search(text)
    return tuple(int(part) for part in match.group(1).split(".")) if match else None


def probe(path: str) -> CriuInfo | str:
    """CriuInfo when `path` runs and reports version >= 4.1, else why not."""
    try:
        done = subprocess.run(
            [path, "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=VERSION_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{path} does not run: {exc}"
    version = parse_version(done.stdout + done.stderr)
    if done.returncode != 0 or version is None:
        detail = (done.stderr or done.stdout).strip()[:200] or f"exit code {done.returncode}"
        return f"`{path} --version` failed: {detail}"
    if version < MIN_VERSION:
        need = ".".join(map(str, MIN_VERSION))
        return f"{path} is CRIU {'.'.join(map(str, version))}, older than {need}"
    return CriuInfo(path, version)


def candidates() -> list[str]:
    """Where to look, in order (see the module docstring)."""
    explicit = os.environ.get(ENV_VAR)
    if explicit:
        return [explicit]
    found = [str(DEFAULT_PATH)] if DEFAULT_PATH.exists() else []
    on_path = shutil.which("criu")
    if on_path and on_path not in found:
        found.append(on_path)
    return found


_cache: tuple[CriuInfo | None, str | None] | None = None


def _lookup() -> tuple[CriuInfo | None, str | None]:
    global _cache
    if _cache is None:
        reasons = []
        for path in candidates():
            result = probe(path)
            if isinstance(result, CriuInfo):
                _cache = (result, None)
                break
            reasons.append(result)
        else:
            found = "; ".join(reasons) if reasons else "no criu binary found"
            _cache = (None, f"no working CRIU >= 4.1 ({found}): {INSTALL_HINT}")
    return _cache


def find_criu() -> CriuInfo | None:
    """The CRIU to use, or None (then `criu_missing_reason()` says why). Cached."""
    return _lookup()[0]


def criu_missing_reason() -> str | None:
    """What is wrong and what to install when `find_criu()` is None; None when it is not."""
    return _lookup()[1]


def forget() -> None:
    """Drop the cached answer (after installing CRIU, or in tests)."""
    global _cache
    _cache = None


_subreaper_set = False


def set_child_subreaper() -> bool:
    """Make this process a child subreaper (prctl(PR_SET_CHILD_SUBREAPER, 1)), once.

    The process tree a CRIU restore detaches from is re-parented to the nearest
    subreaper instead of PID 1, which (on some hosts) reaps late: a dumped-then-killed
    process would keep its PID and a restore to that same PID fails ("File exists").
    A subreaper must reap what it inherits (`reap_child`). True when set."""
    global _subreaper_set
    if not _subreaper_set:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            return False
        _subreaper_set = True
    return True


def reap_child(pid: int) -> bool:
    """Reap `pid` if it is an exited child of this process (e.g. a container init it
    inherited as subreaper); never waits, never touches other children. True if reaped."""
    if pid <= 0:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat.rpartition(")")[2].split()
    if len(fields) < 2 or fields[0] != "Z" or int(fields[1]) != os.getpid():
        return False
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:
        return False


# -- stdio from outside the container -----------------------------------------------------
#
# A container started by `runc run --detach` has stdin /dev/null and stdout/stderr on a log
# file of the host: files on mounts its mount namespace does not have, which CRIU cannot
# dump ("Can't lookup mount=N for fd=1"). runc only passes pipes through. So the dump names
# them external (`external file[MNT_ID:INODE]`, both hex) and the restore hands CRIU its
# own stdio for them (`inherit-fd fd[N]:file[MNT_ID:INODE]`): the restored process then
# writes to the restoring runc's stdout, the target's log file. runc has no flags for
# either: they reach CRIU in a config file named by $CRIU_CONFIG_FILE (`config_env`).


def external_stdio(pid: int) -> dict[int, str]:
    """{fd: "file[mnt:ino]"} for those of `pid`'s fds 0-2 that are files on a mount
    outside its mount namespace (pipes and sockets are left to runc)."""
    try:
        with open(f"/proc/{pid}/mountinfo") as f:
            inside = {int(line.split()[0]) for line in f if line.strip()}
    except OSError:
        return {}
    found = {}
    for fd in (0, 1, 2):
        try:
            info = os.stat(f"/proc/{pid}/fd/{fd}")
            fdinfo = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        if stat.S_ISFIFO(info.st_mode) or stat.S_ISSOCK(info.st_mode):
            continue
        match = re.search(r"^mnt_id:\s*(\d+)", fdinfo, re.MULTILINE)
        if match and int(match.group(1)) not in inside:
            found[fd] = f"file[{int(match.group(1)):x}:{info.st_ino:x}]"
    return found


def dump_options(stdio: Mapping[int, str]) -> list[str]:
    """CRIU config lines for the dump: every external stdio file, once."""
    return [f"external {key}" for key in dict.fromkeys(stdio.values())]


def restore_options(stdio: Mapping[int, str]) -> list[str]:
    """CRIU config lines for the restore: each external file is CRIU's own fd N (the
    restoring runc's stdio), the lowest fd that had it in the dumped process."""
    lines: dict[str, str] = {}
    for fd, key in sorted(stdio.items()):
        lines.setdefault(key, f"inherit-fd fd[{fd}]:{key}")
    return list(lines.values())


def write_config(path: Path, lines: Iterable[str]) -> None:
    """A CRIU config file (one `option value` per line); none at all when `lines` is empty."""
    text = "".join(f"{line}\n" for line in lines)
    if not text:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def config_env(path: Path) -> dict[str, str]:
    """The environment for a runc checkpoint/restore whose CRIU reads config file `path`
    (if it exists); any CRIU_CONFIG_FILE of our own environment is not passed on."""
    env = {k: v for k, v in os.environ.items() if k != CONFIG_ENV}
    if path.exists():
        env[CONFIG_ENV] = str(path)
    return env


def write_stdio_keys(images_dir: Path, stdio: Mapping[int, str]) -> None:
    (images_dir / STDIO_KEYS_FILE).write_text(json.dumps({str(k): v for k, v in stdio.items()}))


def read_stdio_keys(images_dir: Path) -> dict[int, str]:
    try:
        data = json.loads((images_dir / STDIO_KEYS_FILE).read_text())
    except FileNotFoundError:
        return {}
    return {int(k): str(v) for k, v in data.items()}


# -- runc command lines ------------------------------------------------------------------


def runc_checkpoint_argv(
    *,
    runc: str,
    root: Path,
    criu: str,
    container: str,
    images_dir: Path,
    work_dir: Path,
    leave_running: bool = False,
    page_server: str | None = None,
) -> list[str]:
    """`runc checkpoint` of `container` into `images_dir` (CRIU logs in `work_dir`).
    With `page_server` ("ADDRESS:PORT", a `criu page-server` on the target host), the
    memory pages go straight there while the dump runs; `images_dir` gets the rest.

    Namespaces given by path in config.json (our netns) are dumped as external: the
    restore joins whatever netns the restoring bundle's config.json names."""
    argv = [
        runc,
        "--root",
        str(root),
        "--criu",
        criu,
        "checkpoint",
        "--image-path",
        str(images_dir),
        "--work-path",
        str(work_dir),
    ]
    if leave_running:
        argv.append("--leave-running")
    if page_server:
        argv += ["--page-server", page_server]
    argv.append(container)
    return argv


def page_server_argv(criu: str, images_dir: Path, address: str, port: int) -> list[str]:
    """A `criu page-server` that receives one dump's memory pages into `images_dir`, then
    exits: the target side of a checkpoint whose pages skip the source's disk."""
    return [
        criu, "page-server", "--images-dir", str(images_dir),
        "--address", address, "--port", str(port),
    ]  # fmt: skip


def runc_restore_argv(
    *,
    runc: str,
    root: Path,
    criu: str,
    container: str,
    images_dir: Path,
    work_dir: Path,
    bundle: Path,
    pid_file: Path,
) -> list[str]:
    """`runc restore --detach` of `container` from `images_dir`, in `bundle` (its
    config.json decides cgroups, netns path and bind-mount sources on this host)."""
    return [
        runc,
        "--root",
        str(root),
        "--criu",
        criu,
        "restore",
        "--detach",
        "--image-path",
        str(images_dir),
        "--work-path",
        str(work_dir),
        "--bundle",
        str(bundle),
        "--pid-file",
        str(pid_file),
        container,
    ]
