"""A throwaway trust setup over a real swtpm: host, release authority and verifier in one dir.

Used by the integration tests and by `measure_boot_overhead` (fleetvisor bench boot),
so both exercise the very same chain:

    root/tpm/                 swtpm state (EK, AK, NV survive power cycles)
    root/host/loader.json     loader configuration (measured)
    root/host/stage1.json     stage-1 manifest, signed by the lab's release key
    root/host/release.pub     on-disk copy of the release key (checked against NV)
    root/host/agent-code/     copy of the installed fleetvisor package (measured)
    root/host/drivers/NAME    copies of runc / qemu-system / criu where installed
    root/releases/vN/         phase-3 release bundles (a small coordinator tree)

Everything the lab changes is a copy under `root`; the swtpm it starts is stopped
by PID in `close()`. `run_tamper_cases` runs every attack the README lists and
reports whether the boot refused it and the verifier called the host untrusted for
the right reason.
"""

from __future__ import annotations

import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import fleetvisor
from fleetvisor.trust.attest import Evidence, Verdict, make_evidence, verify_evidence
from fleetvisor.trust.boot import BootResult, ReleaseBundle, measured_boot
from fleetvisor.trust.config import LoaderConfig
from fleetvisor.trust.encoding import sha256_digest
from fleetvisor.trust.enrol import EnrolmentRecord, enrol_host
from fleetvisor.trust.errors import BootRefused
from fleetvisor.trust.manifest import (
    Manifest,
    SignedManifest,
    generate_signing_key,
    public_key_pem,
    sign_manifest,
    write_signed_manifest,
)
from fleetvisor.trust.measure import EventLog, digest_path
from fleetvisor.trust.swtpm import Swtpm
from fleetvisor.trust.tpm import TpmSession

DRIVER_BINARIES = {
    "runc": ("/usr/sbin/runc", "/usr/bin/runc"),
    "qemu-system": ("/usr/bin/qemu-system-x86_64",),
    "criu": ("/usr/local/sbin/criu", "/usr/sbin/criu"),
}

BootOutcome = BootResult | BootRefused


def installed_drivers() -> dict[str, Path]:
    """Driver binaries present on this machine, by component name."""
    found: dict[str, Path] = {}
    for name, candidates in DRIVER_BINARIES.items():
        for candidate in candidates:
            if Path(candidate).is_file():
                found[name] = Path(candidate)
                break
    return found


class TrustLab:
    """One enrolled host over a swtpm, with its release key and a verifier. Use as a
    context manager; `boot()` power-cycles the TPM first, as a machine reboot would."""

    def __init__(self, root: Path, *, drivers: dict[str, Path] | None = None) -> None:
        self.root = root
        self.host_dir = root / "host"
        self.release_key = generate_signing_key()
        self._drivers_source = installed_drivers() if drivers is None else drivers
        self.swtpm: Swtpm | None = None
        self.session: TpmSession | None = None
        self.enrolment: EnrolmentRecord | None = None
        self.config: LoaderConfig | None = None
        self.stage1: SignedManifest | None = None
        self.releases: dict[int, ReleaseBundle] = {}
        self.current_release: ReleaseBundle | None = None

    # -- set-up ----------------------------------------------------------------------

    def __enter__(self) -> TrustLab:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        """Start the swtpm, lay out the host's files, enrol, sign stage 1 and release 1."""
        self.host_dir.mkdir(parents=True, exist_ok=True)
        self.power_on()
        agent_code = self.host_dir / "agent-code"
        shutil.copytree(
            Path(fleetvisor.__file__).parent,
            agent_code,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
        drivers_dir = self.host_dir / "drivers"
        drivers_dir.mkdir()
        drivers: dict[str, Path] = {}
        for name, source in self._drivers_source.items():
            drivers[name] = drivers_dir / name
            shutil.copy2(source, drivers[name])
        if not drivers:  # a machine with none of them: measure a stand-in binary
            drivers["runc"] = drivers_dir / "runc"
            drivers["runc"].write_bytes(b"\x7fELF stand-in for runc\n" + bytes(4096))
        key_file = self.host_dir / "release.pub"
        key_file.write_text(public_key_pem(self.release_key.public_key()))
        self.config = LoaderConfig(
            stage1_manifest=self.host_dir / "stage1.json",
            agent_code=agent_code,
            drivers=drivers,
            release_public_key_file=key_file,
        ).write(self.host_dir / "loader.json")
        self.enrolment = enrol_host(self.tpm, self.release_key.public_key())
        self.stage1 = self.sign_stage1()
        self.current_release = self.publish_release(1)

    def sign_stage1(self, key: Ed25519PrivateKey | None = None) -> SignedManifest:
        """Sign (with the lab key, or `key`) a stage-1 manifest of what is installed now."""
        config = self.loaded_config()
        components = {"loader-config": sha256_digest(config.source)}
        for name, path in config.measured_paths():
            components[name] = digest_path(path)
        signed = sign_manifest(
            Manifest("stage1", 1, "stage1", components),
            key or self.release_key,
        )
        write_signed_manifest(config.stage1_manifest, signed)
        return signed

    def publish_release(self, version: int, key: Ed25519PrivateKey | None = None) -> ReleaseBundle:
        """A release bundle `releases/v<version>/coordinator/`, signed by the lab key (or `key`)."""
        tree = self.root / "releases" / f"v{version}" / "coordinator"
        tree.mkdir(parents=True, exist_ok=True)
        (tree / "coordinator.py").write_text(
            f'"""fleetvisor coordinator, release {version}."""\nVERSION = {version}\n'
        )
        (tree / "VERSION").write_text(f"{version}\n")
        manifest = Manifest("release", version, f"v{version}", {"coordinator": digest_path(tree)})
        signed = sign_manifest(manifest, key or self.release_key)
        bundle = ReleaseBundle(signed, {"coordinator": tree})
        if key is None:
            self.releases[version] = bundle
        return bundle

    # -- the TPM ---------------------------------------------------------------------

    @property
    def tpm(self) -> TpmSession:
        assert self.session is not None, "the lab's TPM is off: call power_on()"
        return self.session

    def loaded_config(self) -> LoaderConfig:
        assert self.config is not None
        return LoaderConfig.load(self.host_dir / "loader.json")

    def power_on(self) -> float:
        """Start the swtpm (PCRs at zero) and open a session; the seconds it took."""
        started = time.perf_counter()
        self.swtpm = Swtpm.start(self.root / "tpm")
        self.session = TpmSession(self.swtpm.tcti)
        return time.perf_counter() - started

    def power_off(self) -> None:
        """Close the session and stop the swtpm by PID (state saved)."""
        if self.session is not None:
            self.session.close()
            self.session = None
        if self.swtpm is not None:
            self.swtpm.stop()
            self.swtpm = None

    def close(self) -> None:
        self.power_off()

    # -- boot and attest -------------------------------------------------------------

    def boot(self, release: ReleaseBundle | None | bool = True) -> BootOutcome:
        """Power-cycle the TPM and run the measured boot with `release` (True: the
        current one; None/False: stop after stage 1). A refusal is returned, not raised."""
        self.power_off()
        self.power_on()
        bundle = self.current_release if release is True else release or None
        try:
            return measured_boot(
                self.tpm, self.loaded_config(), (lambda _stage1: bundle) if bundle else None
            )
        except BootRefused as refused:
            return refused

    def evidence(self, outcome: BootOutcome, nonce: bytes) -> Evidence:
        """What the host answers a challenge with after `outcome` (passed or refused)."""
        config = self.loaded_config()
        if isinstance(outcome, BootResult):
            log, manifests = outcome.log, outcome.manifests
        else:  # a refused host still answers, with what it measured before refusing
            log, manifests = outcome.event_log or EventLog(), outcome.manifests
        return make_evidence(
            self.tpm,
            nonce=nonce,
            log=log,
            manifests=manifests,
            pcrs=config.pcrs,
            ak_handle=config.tpm.ak_handle,
            ak_public_pem=self.enrolment.ak_public_pem if self.enrolment else None,
        )

    def current_release_signed(self) -> SignedManifest | None:
        return self.current_release.signed if self.current_release else None

    def verify(
        self,
        evidence: Evidence,
        nonce: bytes,
        *,
        expected_release: SignedManifest | None = None,
        min_release_version: int = 0,
    ) -> Verdict:
        """The controller's verdict on `evidence` for the challenge `nonce`."""
        assert self.enrolment is not None
        return verify_evidence(
            evidence.to_dict(),
            enrolment=self.enrolment,
            nonce=nonce,
            release_public_key=self.release_key.public_key(),
            expected_release=expected_release,
            min_release_version=min_release_version,
        )

    def attest(
        self,
        outcome: BootOutcome,
        *,
        expected_release: SignedManifest | None | bool = True,
        min_release_version: int = 0,
    ) -> Verdict:
        """Challenge with a fresh nonce, answer, verify. `expected_release` True: the
        lab's current release is what the controller assigned."""
        nonce = secrets.token_bytes(32)
        expected = (
            self.current_release_signed()
            if expected_release is True
            else (expected_release or None)
        )
        return self.verify(
            self.evidence(outcome, nonce),
            nonce,
            expected_release=expected,
            min_release_version=min_release_version,
        )


# -- the attacks -----------------------------------------------------------------------


@dataclass
class TamperCase:
    """One attack: how it is staged, and what a correct chain must answer."""

    name: str
    description: str
    refusal: tuple[str, str] | None  # (component, reason) the loader must refuse with
    verdict_reason: str  # the verifier's primary reason
    verdict_component: str = ""


@dataclass
class CaseOutcome:
    case: TamperCase
    refused_with: tuple[str, str] | None
    verdict: Verdict

    @property
    def detected(self) -> bool:
        """The boot refused as expected and the host is untrusted for the expected reason."""
        verdict_ok = (
            not self.verdict.trusted
            and self.verdict.reason == self.case.verdict_reason
            and (
                not self.case.verdict_component
                or self.verdict.findings[0].component == self.case.verdict_component
            )
        )
        return self.refused_with == self.case.refusal and verdict_ok

    def to_dict(self) -> dict[str, object]:
        return {
            "case": self.case.name,
            "detected": self.detected,
            "expected_refusal": list(self.case.refusal) if self.case.refusal else None,
            "refused_with": list(self.refused_with) if self.refused_with else None,
            "verdict": str(self.verdict.state),
            "reason": self.verdict.reason,
            "message": self.verdict.message,
        }


@contextmanager
def flipped_byte(path: Path, offset: int | None = None) -> Iterator[None]:
    """Change one byte of `path` (the middle one by default), restore it afterwards."""
    original = path.read_bytes()
    at = len(original) // 2 if offset is None else offset
    changed = bytearray(original)
    changed[at] ^= 0x01
    path.write_bytes(bytes(changed))
    try:
        yield
    finally:
        path.write_bytes(original)


def _outcome(case: TamperCase, boot: BootOutcome, verdict: Verdict) -> CaseOutcome:
    refused = (boot.component, boot.reason) if isinstance(boot, BootRefused) else None
    return CaseOutcome(case, refused, verdict)


def _tampered_file(lab: TrustLab, case: TamperCase, path: Path) -> CaseOutcome:
    with flipped_byte(path):
        boot = lab.boot()
        return _outcome(case, boot, lab.attest(boot))


def case_agent_code(lab: TrustLab) -> CaseOutcome:
    case = TamperCase(
        "agent-code-byte",
        "one byte of an installed fleetvisor module changed",
        ("agent-code", "digest-mismatch"),
        "component-mismatch",
        "agent-code",
    )
    config = lab.loaded_config()
    return _tampered_file(lab, case, config.agent_code / "agent" / "runtime.py")


def case_driver(lab: TrustLab) -> CaseOutcome:
    config = lab.loaded_config()
    name, path = sorted(config.drivers.items())[0]
    case = TamperCase(
        f"driver-{name}-byte",
        f"one byte of the {name} binary changed",
        (f"driver:{name}", "digest-mismatch"),
        "component-mismatch",
        f"driver:{name}",
    )
    return _tampered_file(lab, case, path)


def case_loader_config(lab: TrustLab) -> CaseOutcome:
    case = TamperCase(
        "loader-config-byte",
        "one byte of the loader configuration changed",
        ("loader-config", "digest-mismatch"),
        "component-mismatch",
        "loader-config",
    )
    path = lab.host_dir / "loader.json"
    original = path.read_bytes()
    at = original.index(b"  ")  # indentation space -> tab: still valid JSON, one byte differs
    with flipped_byte(path, at):
        path.write_bytes(original[:at] + b"\t" + original[at + 1 :])
        boot = lab.boot()
        return _outcome(case, boot, lab.attest(boot))


def case_release_component(lab: TrustLab) -> CaseOutcome:
    case = TamperCase(
        "release-component-byte",
        "one byte of the assigned release's code changed",
        ("coordinator", "digest-mismatch"),
        "component-mismatch",
        "coordinator",
    )
    assert lab.current_release is not None
    tree = lab.current_release.files["coordinator"]
    return _tampered_file(lab, case, tree / "coordinator.py")


def case_stale_nonce(lab: TrustLab) -> CaseOutcome:
    case = TamperCase(
        "stale-nonce", "an old quote (answer to an earlier nonce) replayed", None, "stale-nonce"
    )
    boot = lab.boot()
    old_nonce = secrets.token_bytes(32)
    old_answer = lab.evidence(boot, old_nonce)
    assert lab.verify(old_answer, old_nonce, expected_release=lab.current_release_signed()).trusted
    fresh = secrets.token_bytes(32)
    verdict = lab.verify(old_answer, fresh, expected_release=lab.current_release_signed())
    return _outcome(case, boot, verdict)


def case_edited_log(lab: TrustLab) -> CaseOutcome:
    case = TamperCase(
        "edited-event-log", "the host rewrites its event log to hide a change", None, "log-replay"
    )
    boot = lab.boot()
    assert isinstance(boot, BootResult)
    events = [
        replace(e, digest=sha256_digest(b"what the manifest says"))
        if e.component == "agent-code"
        else e
        for e in boot.log.events
    ]
    forged = replace(boot, log=EventLog(events, dict(boot.log.baselines)))
    return _outcome(case, boot, lab.attest(forged))


def case_foreign_stage1_key(lab: TrustLab) -> CaseOutcome:
    case = TamperCase(
        "foreign-key-stage1",
        "stage-1 manifest signed by another key",
        ("manifest", "wrong-key"),
        "manifest-signature",
        "manifest",
    )
    config = lab.loaded_config()
    original = config.stage1_manifest.read_bytes()
    try:
        lab.sign_stage1(generate_signing_key())
        boot = lab.boot()
        return _outcome(case, boot, lab.attest(boot))
    finally:
        config.stage1_manifest.write_bytes(original)


def case_foreign_release_key(lab: TrustLab) -> CaseOutcome:
    case = TamperCase(
        "foreign-key-release",
        "assigned release manifest signed by another key",
        ("manifest", "wrong-key"),
        "manifest-signature",
        "manifest",
    )
    assert lab.current_release is not None
    version = lab.current_release.signed.manifest.version
    foreign = lab.publish_release(version, key=generate_signing_key())
    try:
        boot = lab.boot(foreign)
        return _outcome(case, boot, lab.attest(boot))
    finally:
        lab.publish_release(version)  # restore the genuine tree


def case_rollback(lab: TrustLab) -> CaseOutcome:
    case = TamperCase(
        "rollback",
        "an older, validly signed release offered after a newer one ran",
        ("manifest", "rollback"),
        "rollback",
        "manifest",
    )
    assert lab.current_release is not None
    old = lab.current_release
    newer = lab.publish_release(old.signed.manifest.version + 1)
    lab.current_release = newer
    upgraded = lab.boot()
    assert isinstance(upgraded, BootResult), f"the upgrade itself failed: {upgraded}"
    boot = lab.boot(old)
    # The controller assigned `newer`; the host was fed the old one (stale cache, MITM).
    return _outcome(case, boot, lab.attest(boot))


def case_swapped_key_file(lab: TrustLab) -> CaseOutcome:
    case = TamperCase(
        "swapped-key-file",
        "release public key file on disk replaced",
        ("release-public-key", "key-file-mismatch"),
        "boot-refused",
        "release-public-key",
    )
    path = lab.host_dir / "release.pub"
    original = path.read_bytes()
    try:
        path.write_text(public_key_pem(generate_signing_key().public_key()))
        boot = lab.boot()
        return _outcome(case, boot, lab.attest(boot))
    finally:
        path.write_bytes(original)


TAMPER_CASES: list[Callable[[TrustLab], CaseOutcome]] = [
    case_agent_code,
    case_driver,
    case_loader_config,
    case_release_component,
    case_stale_nonce,
    case_edited_log,
    case_foreign_stage1_key,
    case_foreign_release_key,
    case_rollback,
    case_swapped_key_file,
]


def run_tamper_cases(lab: TrustLab) -> list[CaseOutcome]:
    """Every attack in TAMPER_CASES against `lab`, each followed by a clean boot that
    must be trusted again (so one case cannot leak into the next)."""
    outcomes = []
    for run in TAMPER_CASES:
        outcomes.append(run(lab))
        clean = lab.boot()
        verdict = lab.attest(clean)
        if not verdict.trusted:
            raise AssertionError(f"after {run.__name__}, a clean boot is untrusted: {verdict}")
    return outcomes
