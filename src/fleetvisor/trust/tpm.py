"""A TPM 2.0 session over tpm2-tools: every operation one auditable command line.

The TPM is named by a TCTI string: `swtpm:host=127.0.0.1,port=P` for a software TPM
(see swtpm.py), `device:/dev/tpmrm0` for a real one behind the kernel's resource
manager. Each call has a timeout, and a failure raises TpmError with the tool's own
stderr and a hint. Commands that load transient objects or sessions flush them
afterwards: a TPM holds only a handful, and a quote fails for lack of slots otherwise.

Only what the boot chain needs is here: PCR read/extend (sha256 bank), persistent
EK/AK, NV indexes (define, write, write-lock, read, counter increment) and quotes.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import ParamSpec, Protocol, TypeVar

from fleetvisor.trust.errors import ToolsMissing, TpmError
from fleetvisor.trust.measure import PCR_SIZE

DEFAULT_TIMEOUT = 15.0
TOOLS = (
    "tpm2_pcrread",
    "tpm2_pcrextend",
    "tpm2_createek",
    "tpm2_createak",
    "tpm2_evictcontrol",
    "tpm2_readpublic",
    "tpm2_flushcontext",
    "tpm2_getcap",
    "tpm2_nvdefine",
    "tpm2_nvwrite",
    "tpm2_nvwritelock",
    "tpm2_nvread",
    "tpm2_nvreadpublic",
    "tpm2_nvincrement",
    "tpm2_quote",
    "tpm2_changeauth",
    "tpm2_dictionarylockout",
)
# Response codes worth a sentence of their own (the low bits of tpm2-tools' messages).
_HINTS = {
    "0x14a": "the NV index was never written (an NV counter must be incremented once)",
    "0x148": "the NV index is write-locked: it was written once at enrolment and is read-only",
    "0x14b": "the NV index is already defined",
    "0x18b": "the handle does not exist: was the host enrolled (fleetvisor trust enrol)?",
    "0x9a2": "wrong authorization value: pass the owner authorization set at enrolment",
    "0x902": "the TPM is out of object memory: flush transient contexts",
    "0x921": "the TPM is in dictionary-attack lockout; wait or reset the lockout",
}
_P = ParamSpec("_P")
_R = TypeVar("_R")
_PCR_LINE = re.compile(r"^\s+(\d+)\s*:\s*0x([0-9A-Fa-f]+)\s*$")


def missing_tools() -> str | None:
    """None when tpm2-tools are installed, else what to install."""
    absent = [tool for tool in TOOLS if shutil.which(tool) is None]
    if absent:
        return f"{', '.join(absent[:3])} not found: apt-get install -y tpm2-tools"
    return None


@dataclass(frozen=True)
class Quote:
    """A quote as the TPM produced it: TPMS_ATTEST bytes, TPMT_SIGNATURE bytes, and the
    PCR values read in the same command."""

    message: bytes
    signature: bytes
    pcr_values: dict[int, bytes]


@dataclass(frozen=True)
class AttestationKey:
    """The AK's public half as PEM, and its TPM name (hex)."""

    public_pem: str
    name: str


class Tpm(Protocol):
    """The TPM operations the boot chain uses. TpmSession (tpm2-tools against swtpm or a
    chip) is the real one; sim.SimulatedTpm models it in memory for simulation and tests."""

    def pcr_read(self, pcrs: Iterable[int]) -> dict[int, bytes]: ...

    def pcr_extend(self, extends: Sequence[tuple[int, bytes]]) -> None: ...

    def persistent_handles(self) -> set[int]: ...

    def create_ek(self, handle: int) -> str: ...

    def create_ak(self, ek_handle: int, handle: int) -> AttestationKey: ...

    def read_public_pem(self, handle: int) -> str: ...

    def read_name(self, handle: int) -> str: ...

    def set_owner_auth(self, new_auth: str) -> None: ...

    def set_lockout_parameters(
        self, *, max_tries: int, recovery_s: int, lockout_recovery_s: int
    ) -> None: ...

    def nv_indexes(self) -> set[int]: ...

    def nv_define(self, index: int, *, size: int | None, attributes: str) -> None: ...

    def nv_write(self, index: int, data: bytes) -> None: ...

    def nv_write_lock(self, index: int) -> None: ...

    def nv_read(self, index: int, size: int) -> bytes: ...

    def nv_attributes(self, index: int) -> str: ...

    def nv_increment(self, index: int) -> None: ...

    def nv_read_counter(self, index: int) -> int: ...

    def quote(self, ak_handle: int, pcrs: Iterable[int], nonce: bytes) -> Quote: ...


def _serialised(method: Callable[_P, _R]) -> Callable[_P, _R]:
    """Hold the session's lock for the whole operation: one command at a time reaches the
    TPM, and a concurrent call cannot overwrite another's work files (quote.msg, ...)."""

    @functools.wraps(method)
    def locked(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        session = args[0]
        assert isinstance(session, TpmSession)
        with session._lock:
            return method(*args, **kwargs)

    return locked


class TpmSession:
    """Commands against one TPM. Use as a context manager: it owns a private work dir.

    Thread-safe: every operation holds the session's lock (an agent may answer an
    attestation challenge while another is in flight)."""

    def __init__(
        self,
        tcti: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        owner_auth: str | None = None,
    ) -> None:
        problem = missing_tools()
        if problem:
            raise ToolsMissing(problem)
        self.tcti = tcti
        self.timeout = timeout
        self.work_dir = Path(tempfile.mkdtemp(prefix="fv-tpm-"))
        os.chmod(self.work_dir, 0o700)
        self._env = {**os.environ, "TPM2TOOLS_TCTI": tcti}
        # tpm2-tools misreport some failures on stdout; never let a user's locale matter.
        self._env["LC_ALL"] = "C"
        self._lock = threading.RLock()
        self._owner_auth_file: Path | None = None
        if owner_auth is not None:
            self._owner_auth_file = self._private_file("owner.auth", owner_auth.encode())

    def __enter__(self) -> TpmSession:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Remove the work dir (quote files, auth files)."""
        shutil.rmtree(self.work_dir, ignore_errors=True)

    # -- running tools ---------------------------------------------------------------

    @_serialised
    def run(self, args: Sequence[str], *, timeout: float | None = None) -> str:
        """Run one tpm2-tools command; its stdout, or TpmError with stderr and a hint."""
        command = " ".join(args)
        try:
            result = subprocess.run(
                list(args),
                capture_output=True,
                env=self._env,
                timeout=timeout or self.timeout,
                cwd=self.work_dir,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise TpmError(
                command,
                f"no answer within {timeout or self.timeout:g} s",
                f"is the TPM at {self.tcti} running and reachable?",
            ) from None
        except FileNotFoundError:
            raise ToolsMissing(f"{args[0]} not found: apt-get install -y tpm2-tools") from None
        if result.returncode != 0:
            stderr = result.stderr.decode(errors="replace").strip()
            raise TpmError(command, _summary(stderr, result.returncode), _hint(stderr))
        return result.stdout.decode(errors="replace")

    def _owner(self) -> list[str]:
        if self._owner_auth_file is None:
            return []
        return ["-P", f"file:{self._owner_auth_file}"]

    def _private_file(self, name: str, data: bytes) -> Path:
        path = self.work_dir / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        return path

    @_serialised
    def flush_transient(self) -> None:
        """Flush transient objects and loaded sessions (tpm2_flushcontext -t, -l)."""
        self.run(["tpm2_flushcontext", "-t"])
        self.run(["tpm2_flushcontext", "-l"])

    # -- PCRs ------------------------------------------------------------------------

    def pcr_read(self, pcrs: Iterable[int]) -> dict[int, bytes]:
        """Current sha256-bank values of `pcrs`."""
        wanted = sorted(set(pcrs))
        text = self.run(["tpm2_pcrread", "sha256:" + ",".join(map(str, wanted))])
        values = _parse_pcr_yaml(text)
        missing = [pcr for pcr in wanted if pcr not in values]
        if missing:
            raise TpmError("tpm2_pcrread", f"no sha256 value for PCR {missing}", "")
        return values

    def pcr_extend(self, extends: Sequence[tuple[int, bytes]]) -> None:
        """Extend each (pcr, 32-byte value) in order, in one command."""
        if not extends:
            return
        args = ["tpm2_pcrextend"]
        for pcr, value in extends:
            if len(value) != PCR_SIZE:
                raise ValueError(f"a sha256 extend value is {PCR_SIZE} bytes, not {len(value)}")
            args.append(f"{pcr}:sha256={value.hex()}")
        self.run(args)

    # -- keys ------------------------------------------------------------------------

    def persistent_handles(self) -> set[int]:
        """Handles of the persistent objects the TPM holds."""
        return {int(h, 16) for h in _yaml_list(self.run(["tpm2_getcap", "handles-persistent"]))}

    @_serialised
    def create_ek(self, handle: int) -> str:
        """Create the ECC P-256 endorsement key and persist it at `handle`; its PEM."""
        try:
            pem = self.work_dir / "ek.pem"
            self.run(
                [
                    "tpm2_createek",
                    "-c",
                    hex(handle),
                    "-G",
                    "ecc",
                    "-u",
                    str(pem),
                    "-f",
                    "pem",
                    *self._endorsement_owner(),
                ]
            )
            return pem.read_text()
        finally:
            self.flush_transient()

    def _endorsement_owner(self) -> list[str]:
        # tpm2_createek persists with owner authorization (-w), not -P.
        if self._owner_auth_file is None:
            return []
        return ["-w", f"file:{self._owner_auth_file}"]

    @_serialised
    def create_ak(self, ek_handle: int, handle: int) -> AttestationKey:
        """Create an ECDSA P-256/sha256 attestation key under the EK, persist it at `handle`."""
        context, pem, name = (self.work_dir / n for n in ("ak.ctx", "ak.pem", "ak.name"))
        try:
            self.run(
                [
                    "tpm2_createak",
                    "-C",
                    hex(ek_handle),
                    "-c",
                    str(context),
                    "-G",
                    "ecc",
                    "-g",
                    "sha256",
                    "-s",
                    "ecdsa",
                    "-u",
                    str(pem),
                    "-f",
                    "pem",
                    "-n",
                    str(name),
                ]
            )
            self.flush_transient()
            self.run(
                ["tpm2_evictcontrol", "-C", "o", "-c", str(context), hex(handle), *self._owner()]
            )
            return AttestationKey(pem.read_text(), name.read_bytes().hex())
        finally:
            self.flush_transient()

    @_serialised
    def read_public_pem(self, handle: int) -> str:
        """PEM public key of the persistent object at `handle`."""
        out = self.work_dir / "public.pem"
        self.run(["tpm2_readpublic", "-c", hex(handle), "-f", "pem", "-o", str(out)])
        return out.read_text()

    @_serialised
    def read_name(self, handle: int) -> str:
        """TPM name (hex) of the persistent object at `handle`."""
        out = self.work_dir / "object.name"
        self.run(["tpm2_readpublic", "-c", hex(handle), "-n", str(out)])
        return out.read_bytes().hex()

    @_serialised
    def set_owner_auth(self, new_auth: str) -> None:
        """Set the owner hierarchy's authorization (from the current one, if any)."""
        new_file = self._private_file("owner.new", new_auth.encode())
        args = ["tpm2_changeauth", "-c", "o", f"file:{new_file}"]
        if self._owner_auth_file is not None:
            args[3:3] = ["-p", f"file:{self._owner_auth_file}"]
        self.run(args)
        self._owner_auth_file = self._private_file("owner.auth", new_auth.encode())
        new_file.unlink()

    def set_lockout_parameters(
        self, *, max_tries: int, recovery_s: int, lockout_recovery_s: int
    ) -> None:
        """Dictionary-attack parameters (needs the lockout hierarchy's empty authorization)."""
        self.run(
            [
                "tpm2_dictionarylockout",
                "-s",
                "-n",
                str(max_tries),
                "-t",
                str(recovery_s),
                "-l",
                str(lockout_recovery_s),
            ]
        )

    # -- NV --------------------------------------------------------------------------

    def nv_indexes(self) -> set[int]:
        """Defined NV indexes."""
        return {int(h, 16) for h in _yaml_list(self.run(["tpm2_getcap", "handles-nv-index"]))}

    def nv_define(self, index: int, *, size: int | None, attributes: str) -> None:
        """Define an NV index in the owner hierarchy with empty index authorization."""
        args = ["tpm2_nvdefine", hex(index), "-C", "o", "-a", attributes, *self._owner()]
        if size is not None:
            args += ["-s", str(size)]
        self.run(args)

    @_serialised
    def nv_write(self, index: int, data: bytes) -> None:
        """Write `data` at offset 0 with owner authorization."""
        path = self.work_dir / "nv.in"
        path.write_bytes(data)
        self.run(["tpm2_nvwrite", hex(index), "-C", "o", "-i", str(path), *self._owner()])

    def nv_write_lock(self, index: int) -> None:
        """Lock the index against writes; with `writedefine` until it is undefined."""
        self.run(["tpm2_nvwritelock", hex(index), "-C", "o", *self._owner()])

    @_serialised
    def nv_read(self, index: int, size: int) -> bytes:
        """Read `size` bytes with the index's own (empty) authorization."""
        out = self.work_dir / "nv.out"
        self.run(["tpm2_nvread", hex(index), "-C", hex(index), "-s", str(size), "-o", str(out)])
        return out.read_bytes()

    def nv_attributes(self, index: int) -> str:
        """The `friendly` attribute string of an NV index (e.g. `ownerwrite|writelocked|...`)."""
        text = self.run(["tpm2_nvreadpublic", hex(index)])
        match = re.search(r"friendly:\s*([a-z_|]+)", text.split("attributes:", 1)[-1])
        return match.group(1) if match else ""

    def nv_increment(self, index: int) -> None:
        """Increment an NV counter by one, with the index's own (empty) authorization."""
        self.run(["tpm2_nvincrement", hex(index), "-C", hex(index)])

    def nv_read_counter(self, index: int) -> int:
        """The 64-bit value of an NV counter."""
        return int.from_bytes(self.nv_read(index, 8), "big")

    # -- quotes ----------------------------------------------------------------------

    @_serialised
    def quote(self, ak_handle: int, pcrs: Iterable[int], nonce: bytes) -> Quote:
        """A quote by the AK over the sha256 `pcrs`, with `nonce` as qualifying data."""
        if not 1 <= len(nonce) <= 64:
            raise ValueError(f"a quote nonce is 1..64 bytes, not {len(nonce)}")
        wanted = sorted(set(pcrs))
        message, signature, pcr_file = (
            self.work_dir / name for name in ("quote.msg", "quote.sig", "quote.pcrs")
        )
        # With -o the tool also lists the PCR values it read alongside the quote.
        text = self.run(
            [
                "tpm2_quote",
                "-c",
                hex(ak_handle),
                "-l",
                "sha256:" + ",".join(map(str, wanted)),
                "-q",
                nonce.hex(),
                "-m",
                str(message),
                "-s",
                str(signature),
                "-o",
                str(pcr_file),
                "-g",
                "sha256",
            ]
        )
        values = _parse_pcr_yaml(text.split("pcrs:", 1)[-1])
        if set(values) != set(wanted):
            raise TpmError("tpm2_quote", f"listed PCRs {sorted(values)}, asked for {wanted}", "")
        return Quote(message.read_bytes(), signature.read_bytes(), values)


def _parse_pcr_yaml(text: str) -> dict[int, bytes]:
    """The sha256 section of tpm2-tools' PCR listing: `  sha256:` then `    N: 0xHEX`."""
    values: dict[int, bytes] = {}
    in_sha256 = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.endswith(":") and not stripped[:-1].isdigit() and ":" not in stripped[:-1]:
            in_sha256 = stripped == "sha256:"
            continue
        match = _PCR_LINE.match(line)
        if in_sha256 and match:
            values[int(match.group(1))] = bytes.fromhex(match.group(2))
    return values


def _yaml_list(text: str) -> list[str]:
    return [line.strip()[2:].strip() for line in text.splitlines() if line.strip().startswith("- ")]


def _summary(stderr: str, returncode: int) -> str:
    """The most telling line of tpm2-tools' stderr: the TPM's own error if present."""
    lines = [line.strip() for line in stderr.splitlines() if line.startswith("ERROR")]
    telling = [line for line in lines if "tpm:" in line or "tcti" in line.lower()]
    chosen = telling or lines or [stderr.strip()]
    return chosen[0].removeprefix("ERROR:").strip() or f"exit code {returncode}"


def _hint(stderr: str) -> str:
    lowered = stderr.lower()
    for code, hint in _HINTS.items():
        if f"({code})" in lowered or f"0x{int(code, 16):08x}" in lowered:
            return hint
    if "connection refused" in lowered or "failed to connect" in lowered:
        return "the TPM is not reachable at this TCTI: is swtpm running?"
    return ""
