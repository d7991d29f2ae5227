"""Attestation: the host proves what it booted; the controller decides whether to trust it.

    controller                                   host (agent)
    nonce = NonceBook.issue(host)  ── nonce ──>  make_evidence(tpm, nonce, boot log)
                                                   TPM quote(AK, PCRs, nonce)
    verify_evidence(...)  <── evidence ───────   {quote, signature, PCR values,
      1 quote signed by the enrolled AK               event log, signed manifests}
      2 quote answers *this* nonce (fresh)
      3 PCR values are the quoted ones
      4 PCRs started from a known value
      5 event log replays to the quoted PCRs
      -- from here on the log is what the TPM saw --
      6 release key measured == enrolled key
      7 manifests the log names are signed by the release key
      8 release is the assigned one, not older (rollback)
      9 every measured component == its manifest's digest
     10 no refusal recorded by the loader
    -> Verdict(trusted | untrusted, reason, findings, evidence summary)

The verifier needs no TPM and no tpm2-tools: quote structures are parsed in
tpm_structs.py and signatures checked with `cryptography`. It never raises on bad
evidence: everything wrong with it becomes a finding, and the first one is the reason.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fleetvisor.trust.config import PcrMap
from fleetvisor.trust.encoding import b64decode, b64encode, sha256_digest
from fleetvisor.trust.enrol import EnrolmentRecord
from fleetvisor.trust.errors import EvidenceMalformed, ManifestInvalid
from fleetvisor.trust.manifest import SignedManifest, key_id, verify_manifest
from fleetvisor.trust.measure import REFUSAL_COMPONENT, ZERO_PCR, EventLog
from fleetvisor.trust.tpm import Tpm
from fleetvisor.trust.tpm_structs import (
    TPM_ALG_SHA256,
    QuoteInfo,
    StructureError,
    parse_attest,
    pcr_digest,
    verify_quote_signature,
)

if TYPE_CHECKING:  # the loader imports this package: keep asyncio out of its start-up
    from fleetvisor.clock import Clock

EVIDENCE_FORMAT = "fleetvisor-evidence/1"
NONCE_SIZE = 32


class AttestationState(StrEnum):
    """A host's standing: trusted (verified evidence), untrusted (evidence failed), or
    unknown (no evidence yet, not enrolled, or no answer)."""

    TRUSTED = "trusted"
    UNTRUSTED = "untrusted"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Evidence:
    """What a host answers a challenge with."""

    nonce: bytes
    quote_message: bytes
    quote_signature: bytes
    pcr_values: Mapping[int, bytes]
    event_log: EventLog
    manifests: Sequence[SignedManifest]
    ak_public_pem: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (bytes as base64 or hex) for the API."""
        return {
            "format": EVIDENCE_FORMAT,
            "nonce": self.nonce.hex(),
            "quote": {
                "message": b64encode(self.quote_message),
                "signature": b64encode(self.quote_signature),
                "pcrs": {str(p): v.hex() for p, v in sorted(self.pcr_values.items())},
            },
            "event_log": self.event_log.to_dict(),
            "manifests": [m.to_dict() for m in self.manifests],
            "ak_public_pem": self.ak_public_pem,
        }

    @classmethod
    def from_dict(cls, data: Any) -> Evidence:
        """Parse evidence sent by a host; EvidenceMalformed (a 422) naming what is wrong."""
        try:
            if not isinstance(data, Mapping) or data.get("format") != EVIDENCE_FORMAT:
                raise ValueError(f'evidence needs "format": "{EVIDENCE_FORMAT}"')
            quote = data["quote"]
            pcrs = {int(p): bytes.fromhex(v) for p, v in dict(quote["pcrs"]).items()}
            if any(len(v) != 32 for v in pcrs.values()):
                raise ValueError("every quoted sha256 PCR value is 32 bytes")
            return cls(
                nonce=bytes.fromhex(str(data["nonce"])),
                quote_message=b64decode(str(quote["message"]), "quote message"),
                quote_signature=b64decode(str(quote["signature"]), "quote signature"),
                pcr_values=pcrs,
                event_log=EventLog.from_dict(data["event_log"]),
                manifests=[SignedManifest.from_dict(m) for m in list(data["manifests"])],
                ak_public_pem=str(data["ak_public_pem"]),
            )
        except EvidenceMalformed:
            raise
        except (KeyError, TypeError, ValueError, ManifestInvalid) as exc:
            what = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
            raise EvidenceMalformed(f"attestation evidence is malformed: {what}") from None


def make_evidence(
    session: Tpm,
    *,
    nonce: bytes,
    log: EventLog,
    manifests: Sequence[SignedManifest],
    pcrs: PcrMap,
    ak_handle: int,
    ak_public_pem: str | None = None,
) -> Evidence:
    """Host side: quote the boot chain's PCRs (and any PCR the log touches) with `nonce`."""
    selection = sorted(set(pcrs.all()) | {event.pcr for event in log.events})
    quote = session.quote(ak_handle, selection, nonce)
    return Evidence(
        nonce=nonce,
        quote_message=quote.message,
        quote_signature=quote.signature,
        pcr_values=quote.pcr_values,
        event_log=log,
        manifests=list(manifests),
        ak_public_pem=ak_public_pem or session.read_public_pem(ak_handle),
    )


@dataclass(frozen=True)
class Finding:
    """One thing wrong with the evidence: a code, a sentence, and what differed."""

    code: str
    message: str
    component: str = ""
    expected: str = ""
    measured: str = ""

    def to_dict(self) -> dict[str, str]:
        return {
            "code": self.code,
            "message": self.message,
            "component": self.component,
            "expected": self.expected,
            "measured": self.measured,
        }


@dataclass(frozen=True)
class Verdict:
    """The controller's decision about one piece of evidence, with why and what it saw."""

    state: AttestationState
    reason: str
    message: str
    findings: list[Finding] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    checked_at: float = 0.0

    @property
    def trusted(self) -> bool:
        return self.state is AttestationState.TRUSTED

    def finding(self, code: str) -> Finding | None:
        """The first finding with this code, if any."""
        return next((f for f in self.findings if f.code == code), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "state": str(self.state),
            "reason": self.reason,
            "message": self.message,
            "findings": [f.to_dict() for f in self.findings],
            "summary": self.summary,
            "checked_at": self.checked_at,
        }


def unknown_verdict(message: str, now: float, reason: str = "no-evidence") -> Verdict:
    """A host with no usable answer yet: not enrolled, unreachable, or never challenged."""
    return Verdict(AttestationState.UNKNOWN, reason, message, checked_at=now)


def verify_evidence(
    evidence: Evidence | Mapping[str, Any],
    *,
    enrolment: EnrolmentRecord,
    nonce: bytes,
    release_public_key: Ed25519PublicKey,
    expected_release: SignedManifest | None = None,
    min_release_version: int = 0,
    now: float = 0.0,
) -> Verdict:
    """Controller side: trusted only if every check in the module docstring passes.

    `nonce` is the one this controller issued for this challenge; `expected_release`
    the release the controller assigned to the host (None: any validly signed one);
    `min_release_version` the highest release version the controller has seen the
    host attest (its own anti-rollback, independent of the host's TPM counter).
    """
    check = _Checker(now)
    try:
        parsed = evidence if isinstance(evidence, Evidence) else Evidence.from_dict(evidence)
    except EvidenceMalformed as exc:
        return check.fail("evidence-malformed", exc.detail)
    if enrolment.release_key_id != key_id(release_public_key):
        return check.fail(
            "trust-anchor",
            f"this host was enrolled with release key {enrolment.release_key_id}, but the "
            f"controller trusts {key_id(release_public_key)}; enrol the host again with the "
            "current release key",
        )
    info = _authentic_quote(check, parsed, enrolment, nonce)
    if info is None:
        return check.verdict()
    check.summary.update(_quote_summary(parsed, info, enrolment))
    log = parsed.event_log
    _check_baselines(check, log, enrolment)
    if not _replays(check, log, parsed.pcr_values, info):
        return check.verdict()
    _check_anchor(check, log, enrolment)
    manifests = _phase_manifests(check, log, parsed.manifests, release_public_key)
    _check_release(check, manifests.get("release"), expected_release, min_release_version)
    for phase, manifest in manifests.items():
        _check_components(check, log, phase, manifest)
    _check_refusals(check, log)
    _check_complete(check, log, manifests, expected_release)
    return check.verdict()


class _Checker:
    """Collects findings and the evidence summary for one verification."""

    def __init__(self, now: float) -> None:
        self.now = now
        self.findings: list[Finding] = []
        self.summary: dict[str, Any] = {}

    def add(self, code: str, message: str, **values: str) -> None:
        self.findings.append(Finding(code, message, **values))

    def fail(self, code: str, message: str, **values: str) -> Verdict:
        self.add(code, message, **values)
        return self.verdict()

    def verdict(self) -> Verdict:
        if not self.findings:
            version = self.summary.get("release_version", self.summary.get("stage1_version"))
            return Verdict(
                AttestationState.TRUSTED,
                "ok",
                f"quote verified; event log replays to the quoted PCRs; every measured "
                f"component matches release version {version}",
                [],
                self.summary,
                self.now,
            )
        first = self.findings[0]
        return Verdict(
            AttestationState.UNTRUSTED,
            first.code,
            first.message,
            list(self.findings),
            self.summary,
            self.now,
        )


def _authentic_quote(
    check: _Checker, evidence: Evidence, enrolment: EnrolmentRecord, nonce: bytes
) -> QuoteInfo | None:
    """Checks 1-3: the quote is the enrolled AK's, for this nonce, over these PCR values."""
    try:
        verify_quote_signature(
            evidence.quote_message, evidence.quote_signature, enrolment.ak_public_pem
        )
        info = parse_attest(evidence.quote_message)
    except (InvalidSignature, StructureError, ValueError) as exc:
        detail = str(exc) or "the signature does not verify"
        check.add(
            "quote-signature",
            f"the quote is not signed by this host's enrolled attestation key "
            f"({enrolment.ak_fingerprint}): {detail}",
            expected=enrolment.ak_fingerprint,
        )
        return None
    if not secrets.compare_digest(info.extra_data, nonce):
        check.add(
            "stale-nonce",
            f"the quote answers nonce {info.extra_data.hex()[:16]}…, not the nonce issued for "
            f"this challenge ({nonce.hex()[:16]}…): a replayed or stale quote",
            expected=nonce.hex(),
            measured=info.extra_data.hex(),
        )
        return None
    selected = info.pcr_selection.get(TPM_ALG_SHA256, [])
    needed = set(enrolment.pcrs.all()) | {e.pcr for e in evidence.event_log.events}
    if not needed <= set(selected):
        check.add(
            "pcr-selection",
            f"the quote covers sha256 PCRs {selected}, not all of {sorted(needed)}",
            expected=str(sorted(needed)),
            measured=str(selected),
        )
        return None
    if (
        any(pcr not in evidence.pcr_values for pcr in selected)
        or pcr_digest(evidence.pcr_values, selected) != info.pcr_digest
    ):
        check.add(
            "pcr-digest",
            "the PCR values sent with the quote are not the ones the TPM signed",
            expected=info.pcr_digest.hex(),
        )
        return None
    return info


def _quote_summary(
    evidence: Evidence, info: QuoteInfo, enrolment: EnrolmentRecord
) -> dict[str, Any]:
    return {
        "ak": enrolment.ak_fingerprint,
        "nonce": info.extra_data.hex(),
        "pcrs": {str(p): v.hex() for p, v in sorted(evidence.pcr_values.items())},
        "tpm_clock_ms": info.clock,
        "tpm_reset_count": info.reset_count,
        "tpm_restart_count": info.restart_count,
        "events": len(evidence.event_log.events),
    }


def _check_baselines(check: _Checker, log: EventLog, enrolment: EnrolmentRecord) -> None:
    """Check 4: each PCR started at zero, or at a value the operator allowed."""
    for pcr, value in sorted(log.baselines.items()):
        if bytes.fromhex(value) == ZERO_PCR or value in enrolment.allowed_baselines.get(pcr, []):
            continue
        check.add(
            "baseline",
            f"PCR {pcr} did not start from its reset value: something was measured into it "
            "before this boot (the chain ran twice since the TPM reset, or other software "
            "extends it); reboot the host, or allow the value in its enrolment",
            component=f"pcr:{pcr}",
            expected="0" * 64,
            measured=value,
        )


def _replays(check: _Checker, log: EventLog, values: Mapping[int, bytes], info: QuoteInfo) -> bool:
    """Check 5: replaying the log gives exactly the quoted PCR values."""
    selected = info.pcr_selection.get(TPM_ALG_SHA256, [])
    replayed = log.replay(selected)
    good = True
    for pcr in selected:
        if replayed[pcr] != values[pcr]:
            good = False
            check.add(
                "log-replay",
                f"the event log does not replay to the quoted value of PCR {pcr}: the log "
                "was edited, truncated, or does not belong to this boot",
                component=f"pcr:{pcr}",
                expected=values[pcr].hex(),
                measured=replayed[pcr].hex(),
            )
    return good


def _check_anchor(check: _Checker, log: EventLog, enrolment: EnrolmentRecord) -> None:
    """Check 6: the loader verified with the enrolled release key."""
    for event in log.components("root"):
        if event.component == "release-public-key" and event.digest != enrolment.release_key_id:
            check.add(
                "trust-anchor",
                "the host verified its manifests with a release key other than the enrolled "
                "one: its TPM's key index was replaced",
                component="release-public-key",
                expected=enrolment.release_key_id,
                measured=event.digest,
            )


def _phase_manifests(
    check: _Checker,
    log: EventLog,
    manifests: Sequence[SignedManifest],
    release_public_key: Ed25519PublicKey,
) -> dict[str, SignedManifest]:
    """Check 7: the manifest each phase measured is among those sent, and validly signed."""
    by_digest = {m.digest(): m for m in manifests}
    found: dict[str, SignedManifest] = {}
    for phase in ("stage1", "release"):
        events = [e for e in log.components(phase) if e.component == "manifest"]
        if not events:
            continue
        signed = by_digest.get(events[0].digest)
        if signed is None:
            check.add(
                "manifest-missing",
                f"the {phase} manifest the host measured was not sent with the evidence",
                component="manifest",
                measured=events[0].digest,
            )
            continue
        try:
            verify_manifest(signed, release_public_key)
        except ManifestInvalid as exc:
            check.add(
                "manifest-signature",
                f"the {phase} manifest the host booted is not signed by the release key: {exc}",
                component="manifest",
                expected=key_id(release_public_key),
                measured=signed.key_id,
            )
            continue
        if signed.manifest.stage != phase:
            check.add(
                "manifest-stage",
                f"the host used a {signed.manifest.stage} manifest for phase {phase}",
                component="manifest",
                expected=phase,
                measured=signed.manifest.stage,
            )
            continue
        found[phase] = signed
        check.summary[f"{phase}_version"] = signed.manifest.version
        check.summary[f"{phase}_label"] = signed.manifest.label
        check.summary[f"{phase}_manifest"] = signed.digest()
    return found


def _check_release(
    check: _Checker,
    release: SignedManifest | None,
    expected: SignedManifest | None,
    min_version: int,
) -> None:
    """Check 8: the release booted is the assigned one and not older than seen before."""
    if release is None:
        return
    version = release.manifest.version
    floor = max(min_version, expected.manifest.version if expected else 0)
    if version < floor:
        check.add(
            "rollback",
            f"the host booted release version {version}, older than version {floor} "
            "(assigned, or already attested): a rollback",
            component="manifest",
            expected=f"version >= {floor}",
            measured=f"version {version}",
        )
    elif expected is not None and release.digest() != expected.digest():
        check.add(
            "release-mismatch",
            f"the host booted release version {version} ({release.manifest.label}), not the "
            f"assigned version {expected.manifest.version} ({expected.manifest.label})",
            component="manifest",
            expected=expected.digest(),
            measured=release.digest(),
        )


def _check_components(check: _Checker, log: EventLog, phase: str, signed: SignedManifest) -> None:
    """Check 9: every component measured in `phase` has its manifest's digest."""
    listed = signed.manifest.components
    measured: dict[str, str] = {}
    for event in log.components(phase):
        if event.component in ("manifest", REFUSAL_COMPONENT):
            continue
        measured[event.component] = event.digest
        expected = listed.get(event.component)
        if expected is None:
            check.add(
                "component-unlisted",
                f"{event.component} was measured in phase {phase} but the {phase} manifest "
                f"(version {signed.manifest.version}) does not list it",
                component=event.component,
                measured=event.digest,
            )
        elif expected != event.digest:
            check.add(
                "component-mismatch",
                f"{event.component} ({event.detail}) measured {event.digest}, but the {phase} "
                f"manifest (version {signed.manifest.version}) expects {expected}",
                component=event.component,
                expected=expected,
                measured=event.digest,
            )
    check.summary.setdefault("components", {})[phase] = measured
    if phase == "release":
        for name, expected in listed.items():
            if name not in measured:
                check.add(
                    "component-missing",
                    f"release version {signed.manifest.version} lists {name}, which the "
                    "host did not measure",
                    component=name,
                    expected=expected,
                )


def _check_refusals(check: _Checker, log: EventLog) -> None:
    """Check 10: the loader did not refuse the boot (and say so in the TPM)."""
    for event in log.events:
        if event.component != REFUSAL_COMPONENT:
            continue
        try:
            detail = json.loads(event.detail)
            if sha256_digest(event.detail.encode()) != event.digest:
                raise ValueError("digest")
            refusal = {k: str(detail[k]) for k in ("component", "expected", "measured", "reason")}
        except (ValueError, KeyError, TypeError):
            refusal = {"component": "?", "expected": "", "measured": "", "reason": "unreadable"}
        check.add(
            "boot-refused",
            f"the host's loader refused to boot in phase {event.phase}: "
            f"{refusal['component']}: {refusal['reason']} (expected {refusal['expected']}, "
            f"measured {refusal['measured']})",
            component=refusal["component"],
            expected=refusal["expected"],
            measured=refusal["measured"],
        )
        check.summary["refusal_reason"] = refusal["reason"]


def _check_complete(
    check: _Checker,
    log: EventLog,
    manifests: Mapping[str, SignedManifest],
    expected_release: SignedManifest | None,
) -> None:
    """The chain ran to its end: root key, stage 1 with its code, and the assigned release."""
    names = {(e.phase, e.component) for e in log.events}
    required = [
        ("root", "release-public-key"),
        ("stage1", "manifest"),
        ("stage1", "loader-config"),
        ("stage1", "agent-code"),
    ]
    if expected_release is not None:
        required.append(("release", "manifest"))
    absent = [f"{phase}/{name}" for phase, name in required if (phase, name) not in names]
    if absent:
        check.add(
            "incomplete-boot",
            f"the event log lacks {', '.join(absent)}: the measured boot did not run to its "
            "end (refused earlier, or the host skipped it)",
            expected=", ".join(absent),
        )


class NonceBook:
    """Outstanding challenges: a nonce per host, single use, expiring after `ttl` seconds.

    For flows where the host fetches a challenge and answers later (e.g. with its
    registration); a controller that calls the host and verifies in one step can keep
    the nonce in a local variable instead."""

    def __init__(self, clock: Clock, ttl: float = 60.0) -> None:
        self.clock = clock
        self.ttl = ttl
        self._issued: dict[str, dict[bytes, float]] = {}

    def issue(self, host: str) -> bytes:
        """A fresh random nonce for `host`."""
        now = self.clock.monotonic()
        pending = self._issued.setdefault(host, {})
        for stale in [n for n, expires in pending.items() if expires <= now]:
            del pending[stale]
        nonce = secrets.token_bytes(NONCE_SIZE)
        pending[nonce] = now + self.ttl
        return nonce

    def redeem(self, host: str, nonce: bytes) -> bool:
        """True exactly once for a nonce issued to `host` that has not expired."""
        expires = self._issued.get(host, {}).pop(nonce, None)
        return expires is not None and self.clock.monotonic() < expires
