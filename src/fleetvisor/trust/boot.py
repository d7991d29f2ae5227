"""The first-stage loader: measure, then verify, then hand over; or refuse, precisely.

    phase 1  root of trust     read the release key from the write-locked NV index
                               (compare the on-disk copy, if configured)
                               measure it                              -> PCR trust
    phase 2  first stage       measure the stage-1 manifest and the loader config
                                                                       -> PCR trust
                               measure agent code and driver binaries  -> PCR code
                               verify the manifest's signature with the NV key and
                               every digest against it
                               -> the caller starts the first coordinator
    phase 3  release update    the first coordinator obtains the release the
                               controller assigned (signed manifest + files)
                               measure manifest and files              -> PCR release
                               verify signature and digests; refuse a version below
                               the TPM's rollback counter; raise the counter
                               -> the caller launches that release

Everything is extended into the TPM *before* it is judged, so even a refused boot
leaves an honest record: a refusal is itself measured (`boot-refused`, with the
component, expected and measured values) and BootRefused carries the event log, so
the host can still answer an attestation challenge truthfully while it stays out of
the fleet.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from fleetvisor.trust.config import LoaderConfig
from fleetvisor.trust.encoding import canonical_json, sha256_digest
from fleetvisor.trust.errors import BootRefused, EnrolmentError, ManifestInvalid, TpmError
from fleetvisor.trust.manifest import (
    Manifest,
    SignedManifest,
    key_id,
    load_public_key,
    public_key_raw,
    verify_manifest,
)
from fleetvisor.trust.measure import REFUSAL_COMPONENT, EventLog, MeasurementEvent, digest_path
from fleetvisor.trust.nv import (
    TrustAnchor,
    highest_release_version,
    raise_release_version,
    read_trust_anchor,
)
from fleetvisor.trust.tpm import Tpm


@dataclass(frozen=True)
class ReleaseBundle:
    """A release obtained for phase 3: its signed manifest and where each component lies
    on this host (a file or a directory tree)."""

    signed: SignedManifest
    files: Mapping[str, Path]


@dataclass
class Stage1Result:
    """What phases 1 and 2 established; phase 3 continues from it."""

    config: LoaderConfig
    anchor: TrustAnchor
    stage1: SignedManifest
    log: EventLog
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class BootResult:
    """A boot that passed: the event log to answer attestation with, and what to launch."""

    log: EventLog
    stage1: SignedManifest
    release: SignedManifest | None
    release_files: dict[str, Path]
    highest_release_version: int | None
    timings: dict[str, float]

    @property
    def manifests(self) -> list[SignedManifest]:
        """The signed manifests the log refers to (sent with attestation evidence)."""
        return [self.stage1] + ([self.release] if self.release else [])

    def to_dict(self) -> dict[str, Any]:
        """JSON form, so a loader process can hand its result to the agent it starts (or an
        agent keep it in /run to answer challenges after a restart without a reboot)."""
        return {
            "log": self.log.to_dict(),
            "stage1": self.stage1.to_dict(),
            "release": self.release.to_dict() if self.release else None,
            "release_files": {name: str(path) for name, path in self.release_files.items()},
            "highest_release_version": self.highest_release_version,
            "timings": self.timings,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BootResult:
        """Parse `to_dict()` output; ValueError or ManifestInvalid if it is damaged."""
        release = data.get("release")
        return cls(
            log=EventLog.from_dict(data["log"]),
            stage1=SignedManifest.from_dict(data["stage1"]),
            release=SignedManifest.from_dict(release) if release else None,
            release_files={k: Path(v) for k, v in dict(data.get("release_files", {})).items()},
            highest_release_version=data.get("highest_release_version"),
            timings={k: float(v) for k, v in dict(data.get("timings", {})).items()},
        )

    def matches(self, session: Tpm, pcrs: Iterable[int]) -> bool:
        """True when the TPM's PCRs are still what this boot's log replays to: a saved
        result may then answer challenges (the TPM was not reset, nothing else ran)."""
        wanted = sorted(set(pcrs) | {event.pcr for event in self.log.events})
        return self.log.replay(wanted) == session.pcr_read(wanted)


class _Measurer:
    """Collects events, extends them into the TPM, and turns a failure into BootRefused."""

    def __init__(
        self, session: Tpm, log: EventLog, manifests: list[SignedManifest] | None = None
    ) -> None:
        self.session = session
        self.log = log
        self.manifests = manifests or []  # the signed manifests read so far
        self.pending: list[MeasurementEvent] = []

    def measure(self, pcr: int, phase: str, component: str, digest: str, detail: str) -> None:
        event = MeasurementEvent(pcr, phase, component, digest, detail)
        self.log.append(event)
        self.pending.append(event)

    def commit(self) -> None:
        """Extend everything measured so far, in log order, in one TPM command."""
        if self.pending:
            self.session.pcr_extend([(e.pcr, e.extend_value()) for e in self.pending])
            self.pending = []

    def refuse(
        self,
        pcr: int,
        phase: str,
        component: str,
        *,
        expected: str,
        measured: str,
        reason: str,
        remedy: str = "",
    ) -> NoReturn:
        fields = dict(expected=expected, measured=measured, reason=reason, phase=phase)
        detail = canonical_json(BootRefused(component, **fields).as_event())
        self.measure(pcr, phase, REFUSAL_COMPONENT, sha256_digest(detail), detail.decode())
        try:
            self.commit()
        except TpmError as exc:  # the refusal stands; say that the TPM record is incomplete
            remedy = f"{remedy}; " if remedy else ""
            remedy += f"the refusal could not be recorded in the TPM: {exc}"
        refused = BootRefused(component, remedy=remedy, **fields)
        refused.event_log = self.log
        refused.manifests = list(self.manifests)
        raise refused


def run_stage1(session: Tpm, config: LoaderConfig) -> Stage1Result:
    """Phases 1 and 2. BootRefused on any mismatch; TpmError if the TPM misbehaves."""
    started = time.perf_counter()
    pcrs = config.pcrs
    log = EventLog(baselines={p: v.hex() for p, v in session.pcr_read(pcrs.all()).items()})
    measurer = _Measurer(session, log)

    # Phase 1: the root of trust is the key in the locked NV index, never a file.
    try:
        anchor = read_trust_anchor(session, config.tpm)
    except (TpmError, EnrolmentError) as exc:
        measurer.refuse(
            pcrs.trust,
            "root",
            "release-public-key",
            expected="an enrolled TPM",
            measured=f"no release key in NV index {config.tpm.nv_release_key:#x}",
            reason="not-enrolled",
            remedy=f"enrol this host first ({exc})",
        )
    measurer.measure(
        pcrs.trust,
        "root",
        "release-public-key",
        anchor.key_id,
        f"nv {config.tpm.nv_release_key:#x}",
    )
    if config.release_public_key_file is not None:
        _check_key_file(measurer, config, anchor)
    phase1_done = time.perf_counter()

    # Phase 2: measure everything the first coordinator consists of, then judge it.
    manifest_bytes, manifest_error = _read(config.stage1_manifest)
    signed: SignedManifest | None = None
    if manifest_error is None:
        try:
            signed = SignedManifest.from_bytes(manifest_bytes)
            measurer.manifests.append(signed)
        except ManifestInvalid as exc:
            manifest_error = str(exc)
    manifest_digest = signed.digest() if signed else sha256_digest(manifest_bytes)
    detail = f"version {signed.manifest.version}" if signed else "unreadable"
    measurer.measure(pcrs.trust, "stage1", "manifest", manifest_digest, detail)
    measurer.measure(
        pcrs.trust, "stage1", "loader-config", sha256_digest(config.source), "loader configuration"
    )
    measured: dict[str, str] = {"loader-config": sha256_digest(config.source)}
    missing: list[tuple[str, Path, str]] = []
    for name, path in config.measured_paths():
        digest, problem = _measure_path(path)
        measured[name] = digest
        measurer.measure(pcrs.code, "stage1", name, digest, str(path))
        if problem:
            missing.append((name, path, problem))
    measurer.commit()

    if signed is None:
        measurer.refuse(
            pcrs.trust,
            "stage1",
            "manifest",
            expected="a signed stage-1 manifest",
            measured=manifest_error or "unreadable",
            reason="malformed",
            remedy=f"install the stage-1 manifest at {config.stage1_manifest}",
        )
    manifest = _verified(measurer, pcrs.trust, "stage1", signed, anchor, "stage1")
    for name, path, problem in missing:
        measurer.refuse(
            pcrs.code,
            "stage1",
            name,
            expected=manifest.components.get(name, "listed"),
            measured=problem,
            reason="missing",
            remedy=f"install {path} or fix the loader config",
        )
    _compare(measurer, pcrs.code, "stage1", manifest, measured, exact=False)
    done = time.perf_counter()
    return Stage1Result(
        config,
        anchor,
        signed,
        log,
        {"phase1_s": phase1_done - started, "stage1_s": done - phase1_done},
    )


def run_release(session: Tpm, stage1: Stage1Result, bundle: ReleaseBundle) -> BootResult:
    """Phase 3: measure and verify the assigned release, enforce and raise the rollback floor."""
    started = time.perf_counter()
    pcr = stage1.config.pcrs.release
    layout = stage1.config.tpm
    signed = bundle.signed
    measurer = _Measurer(session, stage1.log, [stage1.stage1, signed])
    measurer.measure(
        pcr,
        "release",
        "manifest",
        signed.digest(),
        f"version {signed.manifest.version} {signed.manifest.label}".strip(),
    )
    measured: dict[str, str] = {}
    missing: list[tuple[str, str]] = []
    for name, path in sorted(bundle.files.items()):
        digest, problem = _measure_path(path)
        measured[name] = digest
        measurer.measure(pcr, "release", name, digest, str(path))
        if problem:
            missing.append((name, problem))
    measurer.commit()

    manifest = _verified(measurer, pcr, "release", signed, stage1.anchor, "release")
    for name, problem in missing:
        measurer.refuse(
            pcr,
            "release",
            name,
            expected=manifest.components.get(name, "listed"),
            measured=problem,
            reason="missing",
            remedy="fetch the release again",
        )
    _compare(measurer, pcr, "release", manifest, measured, exact=True)
    floor = highest_release_version(session, layout, stage1.anchor)
    if manifest.version < floor:
        measurer.refuse(
            pcr,
            "release",
            "manifest",
            expected=f"version >= {floor}",
            measured=f"version {manifest.version}",
            reason="rollback",
            remedy=f"this host already ran release version {floor}; assign it that release "
            "or a newer one",
        )
    try:
        floor = raise_release_version(session, layout, stage1.anchor, manifest.version)
    except ValueError as exc:
        measurer.refuse(
            pcr,
            "release",
            "manifest",
            expected=f"version <= {floor} + step",
            measured=f"version {manifest.version}",
            reason="version-jump",
            remedy=str(exc),
        )
    timings = dict(stage1.timings, release_s=time.perf_counter() - started)
    return BootResult(stage1.log, stage1.stage1, signed, dict(bundle.files), floor, timings)


def measured_boot(
    session: Tpm,
    config: LoaderConfig,
    obtain_release: Callable[[Stage1Result], ReleaseBundle | None] | None = None,
) -> BootResult:
    """The whole chain. `obtain_release` runs only once phase 2 passed (it is the first
    coordinator's job: ask the controller which release to run, fetch it); None or a
    None answer ends the boot at the first coordinator."""
    stage1 = run_stage1(session, config)
    bundle = obtain_release(stage1) if obtain_release else None
    if bundle is None:
        return BootResult(stage1.log, stage1.stage1, None, {}, None, dict(stage1.timings))
    return run_release(session, stage1, bundle)


def _check_key_file(measurer: _Measurer, config: LoaderConfig, anchor: TrustAnchor) -> None:
    """The on-disk copy of the release key must be the NV one: a swapped file is an attack."""
    path = config.release_public_key_file
    assert path is not None
    data, problem = _read(path)
    file_key = None
    if problem is None:
        try:
            file_key = load_public_key(data)
        except ManifestInvalid as exc:
            problem = str(exc)
    if file_key is None or public_key_raw(file_key) != public_key_raw(anchor.public_key):
        measurer.refuse(
            config.pcrs.trust,
            "root",
            "release-public-key",
            expected=anchor.key_id,
            measured=key_id(file_key) if file_key else f"{sha256_digest(data)} ({problem})",
            reason="key-file-mismatch",
            remedy=f"{path} is not the release key enrolled in the TPM; restore it, or "
            "re-enrol the host if the release key really changed",
        )


def _verified(
    measurer: _Measurer,
    pcr: int,
    phase: str,
    signed: SignedManifest,
    anchor: TrustAnchor,
    stage: str,
) -> Manifest:
    try:
        manifest = verify_manifest(signed, anchor.public_key)
    except ManifestInvalid as exc:
        measurer.refuse(
            pcr,
            phase,
            "manifest",
            expected=f"signed by {anchor.key_id}",
            measured=f"signed by {signed.key_id}"
            if exc.reason == "wrong-key"
            else "signature does not verify",
            reason=exc.reason,
            remedy=str(exc),
        )
    if manifest.stage != stage:
        measurer.refuse(
            pcr,
            phase,
            "manifest",
            expected=f"stage {stage}",
            measured=f"stage {manifest.stage}",
            reason="wrong-stage",
            remedy=f"give phase {phase} a manifest made for stage {stage}",
        )
    return manifest


def _compare(
    measurer: _Measurer,
    pcr: int,
    phase: str,
    manifest: Manifest,
    measured: Mapping[str, str],
    *,
    exact: bool,
) -> None:
    """Every measured component must be listed with the same digest; with `exact`, every
    listed component must also have been measured."""
    for name, digest in measured.items():
        expected = manifest.components.get(name)
        if expected is None:
            measurer.refuse(
                pcr,
                phase,
                name,
                expected="listed in the manifest",
                measured=digest,
                reason="unlisted",
                remedy=f"add {name} to the {manifest.stage} manifest or stop measuring it",
            )
        if expected != digest:
            measurer.refuse(
                pcr,
                phase,
                name,
                expected=expected,
                measured=digest,
                reason="digest-mismatch",
                remedy=f"{name} differs from release {manifest.label or manifest.version}: "
                "reinstall it from the release, or sign a manifest for what is installed",
            )
    if exact:
        for name, expected in manifest.components.items():
            if name not in measured:
                measurer.refuse(
                    pcr,
                    phase,
                    name,
                    expected=expected,
                    measured="absent",
                    reason="missing",
                    remedy=f"the release bundle lacks {name}; fetch the release again",
                )


def _read(path: Path) -> tuple[bytes, str | None]:
    try:
        return path.read_bytes(), None
    except OSError as exc:
        return b"", f"cannot read {path}: {exc.strerror or exc}"


def _measure_path(path: Path) -> tuple[str, str | None]:
    """Digest of a file or tree; for something unreadable, a digest of its absence."""
    try:
        return digest_path(path), None
    except OSError as exc:
        problem = f"cannot read {path}: {exc.strerror or exc}"
        return sha256_digest(f"absent:{path}".encode()), problem
