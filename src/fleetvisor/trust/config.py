"""The first-stage loader's configuration: what to measure, into which PCRs, where in the TPM.

It is a JSON file, measured itself (as `loader-config`) from the exact bytes that are
then parsed, so what was measured is what is used. It holds only the security policy
(paths of measured components, PCR map, TPM handles), nothing host-specific such as
names or ports, so one signed stage-1 manifest fits every host built the same way.

    {
      "format": "fleetvisor-loader/1",
      "stage1_manifest": "/etc/fleetvisor/stage1.manifest.json",
      "agent_code": "/usr/lib/python3/dist-packages/fleetvisor",
      "drivers": {"runc": "/usr/sbin/runc", "qemu-system": "/usr/bin/qemu-system-x86_64"},
      "release_public_key_file": "/etc/fleetvisor/release.pub",       (optional)
      "pcrs": {"trust": 12, "code": 13, "release": 14},                (optional)
      "tpm": {"ak_handle": "0x81000f10", ...}                          (optional)
    }
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetvisor.trust.errors import ConfigInvalid

LOADER_FORMAT = "fleetvisor-loader/1"
_DRIVER = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


@dataclass(frozen=True)
class PcrMap:
    """Which sha256 PCR each group of measurements goes to.

    trust: the release public key, the stage-1 manifest, the loader configuration;
    code: the first coordinator's code and the driver binaries; release: the phase-3
    release manifest and its components. 12-14 are extended only before the kernel on
    common distributions (systemd-stub, shim), so a real TPM's values there are stable
    after boot; change them where that is not so.
    """

    trust: int = 12
    code: int = 13
    release: int = 14

    def all(self) -> list[int]:
        return sorted({self.trust, self.code, self.release})

    def to_dict(self) -> dict[str, int]:
        return {"trust": self.trust, "code": self.code, "release": self.release}

    @classmethod
    def from_dict(cls, data: Any) -> PcrMap:
        if not isinstance(data, Mapping) or set(data) - {"trust", "code", "release"}:
            raise ConfigInvalid('pcrs must be {"trust": N, "code": N, "release": N}')
        values = {key: data[key] for key in data}
        for key, value in values.items():
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 23:
                raise ConfigInvalid(f"pcrs.{key} must be a PCR index 0..23, not {value!r}")
        return cls(**values)


@dataclass(frozen=True)
class TpmLayout:
    """Where enrolment puts things in the TPM.

    ek_handle: TCG's handle for the ECC P-256 endorsement key; ak_handle: an
    owner-range persistent handle for the attestation key; nv_release_key: 40 bytes,
    the release public key (32) then the rollback counter's base (8), write-locked;
    nv_rollback_counter: a monotonic NV counter (highest release version = value - base).
    """

    ek_handle: int = 0x81010002
    ak_handle: int = 0x81000F10
    nv_release_key: int = 0x01500F10
    nv_rollback_counter: int = 0x01500F11

    def to_dict(self) -> dict[str, str]:
        return {
            "ek_handle": hex(self.ek_handle),
            "ak_handle": hex(self.ak_handle),
            "nv_release_key": hex(self.nv_release_key),
            "nv_rollback_counter": hex(self.nv_rollback_counter),
        }

    @classmethod
    def from_dict(cls, data: Any) -> TpmLayout:
        fields = ("ek_handle", "ak_handle", "nv_release_key", "nv_rollback_counter")
        if not isinstance(data, Mapping) or set(data) - set(fields):
            raise ConfigInvalid(f"tpm must be an object with some of {', '.join(fields)}")
        values: dict[str, int] = {}
        for key, value in data.items():
            try:
                values[key] = int(value, 16) if isinstance(value, str) else int(value)
            except (TypeError, ValueError):
                raise ConfigInvalid(f"tpm.{key} must be a handle like 0x81000f10") from None
        return cls(**values)


@dataclass(frozen=True)
class LoaderConfig:
    """The parsed configuration, plus the exact bytes it was parsed from (the measured ones)."""

    stage1_manifest: Path
    agent_code: Path
    drivers: Mapping[str, Path] = field(default_factory=dict)
    release_public_key_file: Path | None = None
    pcrs: PcrMap = field(default_factory=PcrMap)
    tpm: TpmLayout = field(default_factory=TpmLayout)
    source: bytes = b""

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "format": LOADER_FORMAT,
            "stage1_manifest": str(self.stage1_manifest),
            "agent_code": str(self.agent_code),
            "drivers": {name: str(path) for name, path in sorted(self.drivers.items())},
            "pcrs": self.pcrs.to_dict(),
            "tpm": self.tpm.to_dict(),
        }
        if self.release_public_key_file is not None:
            data["release_public_key_file"] = str(self.release_public_key_file)
        return data

    def dumps(self) -> bytes:
        """The file form (indented JSON, as an operator would keep it)."""
        return (json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n").encode()

    def write(self, path: Path) -> LoaderConfig:
        """Write the file; return the config as it will be loaded (with `source` set)."""
        data = self.dumps()
        path.write_bytes(data)
        return LoaderConfig.from_bytes(data)

    def measured_paths(self) -> list[tuple[str, Path]]:
        """(component name, path) of the code the first stage will run, in measuring order."""
        return [("agent-code", self.agent_code)] + [
            (f"driver:{name}", path) for name, path in sorted(self.drivers.items())
        ]

    @classmethod
    def load(cls, path: Path) -> LoaderConfig:
        """Read and parse the file; ConfigInvalid saying what to fix."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigInvalid(f"cannot read the loader configuration {path}: {exc}") from None
        return cls.from_bytes(data, path)

    @classmethod
    def from_bytes(cls, data: bytes, origin: Path | None = None) -> LoaderConfig:
        where = f" ({origin})" if origin else ""
        try:
            raw = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigInvalid(f"loader configuration{where} is not JSON: {exc}") from None
        if not isinstance(raw, Mapping) or raw.get("format") != LOADER_FORMAT:
            raise ConfigInvalid(f'loader configuration{where} needs "format": "{LOADER_FORMAT}"')
        known = {
            "format",
            "stage1_manifest",
            "agent_code",
            "drivers",
            "release_public_key_file",
            "pcrs",
            "tpm",
        }
        unknown = set(raw) - known
        if unknown:
            raise ConfigInvalid(f"loader configuration{where}: unknown keys {sorted(unknown)}")
        for key in ("stage1_manifest", "agent_code"):
            if not isinstance(raw.get(key), str) or not raw[key]:
                raise ConfigInvalid(f"loader configuration{where}: {key} must be a path")
        drivers = raw.get("drivers", {})
        if not isinstance(drivers, Mapping) or not all(
            isinstance(k, str) and _DRIVER.fullmatch(k) and isinstance(v, str)
            for k, v in drivers.items()
        ):
            raise ConfigInvalid(
                f"loader configuration{where}: drivers must map names like runc to paths"
            )
        key_file = raw.get("release_public_key_file")
        if key_file is not None and not isinstance(key_file, str):
            raise ConfigInvalid(f"loader configuration{where}: release_public_key_file: a path")
        return cls(
            stage1_manifest=Path(raw["stage1_manifest"]),
            agent_code=Path(raw["agent_code"]),
            drivers={name: Path(path) for name, path in drivers.items()},
            release_public_key_file=Path(key_file) if key_file else None,
            pcrs=PcrMap.from_dict(raw.get("pcrs", {})),
            tpm=TpmLayout.from_dict(raw.get("tpm", {})),
            source=data,
        )
