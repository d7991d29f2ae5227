"""Measurements: digests of files and trees, the event log, and its replay to PCR values.

A measurement is recorded twice: extended into a TPM PCR (which nobody can rewind)
and appended to the event log (which says what each extend was). A verifier replays
the log in pure Python and must reach exactly the PCR values the TPM quoted; only
then does it believe what the log says.

Each event's extend value is sha256 of the canonical JSON of {phase, component,
digest, detail}: the label is bound to the digest, so a log whose entries were
renamed, reordered within a PCR, or edited no longer replays to the quoted values.
Only the sha256 PCR bank is used.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetvisor.trust.encoding import canonical_json, is_digest, sha256_digest

PCR_SIZE = 32
ZERO_PCR = bytes(PCR_SIZE)
CHUNK = 1 << 20
PHASES = ("root", "stage1", "release")
REFUSAL_COMPONENT = "boot-refused"  # the loader measures its own refusal under this name
# Written by Python at run time, so their digests change between boots without any
# code change; see README "What it does not protect".
SKIPPED_DIRS = frozenset({"__pycache__"})
SKIPPED_SUFFIXES = (".pyc", ".pyo")


def digest_file(path: Path) -> str:
    """`sha256:<hex>` of a file's content, read in 1 MiB chunks."""
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            hasher.update(chunk)
    return "sha256:" + hasher.hexdigest()


def tree_entries(root: Path) -> list[str]:
    """One canonical JSON line per file or symlink under `root`, sorted by relative path.

    A file is `["F", path, "sha256:<hex>"]`; a symlink is `["L", path, target]` (not
    followed, so a link cannot pull in files from outside the tree). JSON keeps names
    with spaces or newlines unambiguous. Byte-code caches are skipped.
    """
    entries: list[tuple[str, str]] = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in SKIPPED_DIRS)
        base = Path(directory)
        names = list(files) + [d for d in subdirs if (base / d).is_symlink()]
        for name in names:
            if name.endswith(SKIPPED_SUFFIXES):
                continue
            path = base / name
            relative = path.relative_to(root).as_posix()
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                entries.append((relative, _line(["L", relative, os.readlink(path)])))
            elif stat.S_ISREG(mode):
                entries.append((relative, _line(["F", relative, digest_file(path)])))
    return [line for _, line in sorted(entries)]


def _line(fields: list[str]) -> str:
    return canonical_json(fields).decode()


def digest_tree(root: Path) -> str:
    """`sha256:<hex>` of a directory tree: the digest of its sorted entry lines."""
    return sha256_digest("".join(line + "\n" for line in tree_entries(root)).encode())


def digest_path(path: Path) -> str:
    """Digest of a file (its bytes) or of a directory (its tree). Symlinks are resolved
    first, so `/usr/bin/qemu-system-x86_64 -> ...` measures the binary that will run."""
    resolved = path.resolve(strict=True)
    return digest_tree(resolved) if resolved.is_dir() else digest_file(resolved)


def extend(pcr_value: bytes, value: bytes) -> bytes:
    """What TPM2_PCR_Extend does in the sha256 bank: sha256(old || value)."""
    return hashlib.sha256(pcr_value + value).digest()


@dataclass(frozen=True)
class MeasurementEvent:
    """One record of the event log: what was measured into which PCR, in which phase."""

    pcr: int
    phase: str
    component: str
    digest: str
    detail: str = ""

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"phase {self.phase!r} is not one of {', '.join(PHASES)}")
        if not 0 <= self.pcr <= 23:
            raise ValueError(f"PCR {self.pcr} is outside 0..23")
        if not is_digest(self.digest):
            raise ValueError(f"digest {self.digest!r} of {self.component} is not sha256:<hex>")

    def extend_value(self) -> bytes:
        """The 32 bytes extended into the PCR: binds phase, name, digest and detail."""
        body = {
            "phase": self.phase,
            "component": self.component,
            "digest": self.digest,
            "detail": self.detail,
        }
        return hashlib.sha256(canonical_json(body)).digest()

    def to_dict(self) -> dict[str, Any]:
        return {
            "pcr": self.pcr,
            "phase": self.phase,
            "component": self.component,
            "digest": self.digest,
            "detail": self.detail,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MeasurementEvent:
        """Parse one record; ValueError saying which field is wrong."""
        if not isinstance(data, Mapping):
            raise ValueError("an event log record must be an object")
        pcr, phase = data.get("pcr"), data.get("phase")
        component, digest = data.get("component"), data.get("digest")
        detail = data.get("detail", "")
        if not isinstance(pcr, int) or isinstance(pcr, bool):
            raise ValueError("event log record: pcr must be an integer")
        for name, value in (("phase", phase), ("component", component), ("detail", detail)):
            if not isinstance(value, str):
                raise ValueError(f"event log record: {name} must be a string")
        return cls(
            pcr=pcr,
            phase=str(phase),
            component=str(component),
            digest=str(digest),
            detail=str(detail),
        )


@dataclass
class EventLog:
    """Ordered measurements plus the PCR values they started from (`baselines`, hex).

    A PCR missing from `baselines` starts at zero: its reset value, which is what a
    freshly started swtpm or a machine that just booted holds.
    """

    events: list[MeasurementEvent] = field(default_factory=list)
    baselines: dict[int, str] = field(default_factory=dict)

    def append(self, event: MeasurementEvent) -> None:
        self.events.append(event)

    def components(self, phase: str) -> list[MeasurementEvent]:
        """Events of one phase, in log order."""
        return [event for event in self.events if event.phase == phase]

    def replay(self, pcrs: Iterable[int]) -> dict[int, bytes]:
        """The PCR values this log leads to, for each PCR in `pcrs`."""
        return replay(self.events, pcrs, self.baselines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "baselines": {str(pcr): value for pcr, value in sorted(self.baselines.items())},
            "events": [event.to_dict() for event in self.events],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EventLog:
        """Parse a log sent by a host; ValueError on any malformed part."""
        if not isinstance(data, Mapping):
            raise ValueError("event log must be an object with baselines and events")
        raw_events = data.get("events")
        raw_baselines = data.get("baselines", {})
        if not isinstance(raw_events, list) or not isinstance(raw_baselines, Mapping):
            raise ValueError("event log: events must be a list and baselines an object")
        baselines: dict[int, str] = {}
        for key, value in raw_baselines.items():
            if not str(key).isdigit() or not isinstance(value, str) or len(value) != 64:
                raise ValueError(f"event log: baseline {key!r} must map a PCR to 64 hex digits")
            try:
                bytes.fromhex(value)
            except ValueError as exc:
                raise ValueError(f"event log: baseline of PCR {key} is not hex") from exc
            baselines[int(key)] = value.lower()
        return cls(events=[MeasurementEvent.from_dict(e) for e in raw_events], baselines=baselines)


def replay(
    events: Iterable[MeasurementEvent],
    pcrs: Iterable[int],
    baselines: Mapping[int, str] | None = None,
) -> dict[int, bytes]:
    """Fold every event's extend value into its PCR, starting from its baseline (or zero)."""
    baselines = baselines or {}
    values = {pcr: bytes.fromhex(baselines[pcr]) if pcr in baselines else ZERO_PCR for pcr in pcrs}
    for event in events:
        if event.pcr in values:
            values[event.pcr] = extend(values[event.pcr], event.extend_value())
    return values
