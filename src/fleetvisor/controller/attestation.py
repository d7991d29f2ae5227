"""Attestation: hosts prove what they booted; the controller records trusted | untrusted | unknown.

    operator ── enrol(host, EnrolmentRecord, release key) ──> host_enrolments
    operator ── publish(signed release manifest) ──────────> releases (highest = assigned)

    controller-initiated (at registration, then every attestation_interval):
      loop ── nonce (NonceBook) ── AgentClient.attest ──> agent: TPM quote + event log
           <── evidence ── verify_evidence(enrolment, nonce, release key,
                                           assigned release, min_release_version)
    host-initiated (a refused boot reports itself; nothing else needs it):
      agent ── issue_nonce ──> nonce ── submit(nonce, evidence, refusal) ──> verdict
    ──> hosts.attestation_state / attestation (verdict) / attested_at / min_release_version
        + event host.trusted | host.untrusted (reason, findings) when the standing changes

A host that is not enrolled stays `unknown` (it takes any instance that does not require
a trusted host). An enrolled host is `unknown` from its registration until its first
verdict. A registration resets the standing (`awaiting_attestation`), so an agent that
restarts without measured boot cannot keep the trust its predecessor earned.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import select
from sqlalchemy.orm import Session

from fleetvisor.clock import Clock
from fleetvisor.controller import events
from fleetvisor.controller.agent_client import AgentClients
from fleetvisor.controller.naming import check_name
from fleetvisor.controller.settings import ControllerSettings
from fleetvisor.errors import AgentUnreachable, Conflict, DriverError, InvalidInput, NotFound
from fleetvisor.model.entities import HostState
from fleetvisor.store.db import Database
from fleetvisor.store.tables import EnrolmentRow, HostRow, ReleaseRow, SettingRow
from fleetvisor.trust.attest import (
    AttestationState,
    Finding,
    NonceBook,
    Verdict,
    unknown_verdict,
    verify_evidence,
)
from fleetvisor.trust.enrol import EnrolmentRecord
from fleetvisor.trust.errors import TrustError
from fleetvisor.trust.manifest import SignedManifest, key_id, load_public_key, verify_manifest

log = logging.getLogger(__name__)

RELEASE_KEY_SETTING = "trust.release_public_key"
CHALLENGE_CONCURRENCY = 8
UNANSWERED_RETRY = 15.0  # seconds before a host that did not answer is challenged again
REFUSAL_FIELDS = ("component", "expected", "measured", "reason", "phase")


@runtime_checkable
class Attester(Protocol):
    """An agent client that can answer a challenge (HttpAgentClient; in-process test agents)."""

    async def attest(self, nonce: bytes) -> dict[str, Any]: ...


def awaiting_attestation(now: float) -> dict[str, Any]:
    """Host columns for a host that just (re-)registered: unknown until challenged."""
    verdict = unknown_verdict(
        "registered; waiting for the controller's attestation challenge",
        now,
        reason="awaiting-challenge",
    )
    return {
        "attestation_state": str(verdict.state),
        "attestation": verdict.to_dict(),
        "attested_at": None,
    }


class AttestationService:
    def __init__(
        self, db: Database, clock: Clock, settings: ControllerSettings, clients: AgentClients
    ) -> None:
        self.db = db
        self.clock = clock
        self.settings = settings
        self.clients = clients
        self.nonces = NonceBook(clock, ttl=settings.attestation_nonce_ttl)
        self._nonce_lock = threading.Lock()

    # -- the release key ---------------------------------------------------------------

    def release_key(self) -> Ed25519PublicKey | None:
        """The release public key this controller verifies manifests with, once configured."""
        with self.db.read() as session:
            row = session.get(SettingRow, RELEASE_KEY_SETTING)
            return load_public_key(row.value.encode()) if row else None

    def _trusted_key(self, session: Session, offered_pem: str | None) -> Ed25519PublicKey:
        """The configured release key; `offered_pem` configures it the first time and must
        equal it afterwards (changing the key is re-keying every host, never implicit)."""
        row = session.get(SettingRow, RELEASE_KEY_SETTING)
        offered = _public_key(offered_pem) if offered_pem else None
        if row is None:
            if offered is None:
                raise Conflict(
                    "the controller has no release public key yet; pass the release key "
                    "(fleetvisor release publish/host enroll --public-key release.pub)"
                )
            pem = _plain_text(offered_pem or "", "release_public_key")
            session.add(SettingRow(key=RELEASE_KEY_SETTING, value=pem))
            return offered
        current = load_public_key(row.value.encode())
        if offered is not None and key_id(offered) != key_id(current):
            raise Conflict(
                f"the controller trusts release key {key_id(current)}, not {key_id(offered)}; "
                "sign with the controller's release key (re-keying the fleet means enrolling "
                "every host again with a new controller state)"
            )
        return current

    # -- enrolment ---------------------------------------------------------------------

    def enrol(
        self, host: str, record: Mapping[str, Any], release_public_key: str | None = None
    ) -> EnrolmentRow:
        """Register a host's TPM enrolment (done once by an operator, before it joins)."""
        check_name("host", host)
        _plain_json(record, "record")
        try:
            parsed = EnrolmentRecord.from_dict(record)
            ak = serialization.load_pem_public_key(parsed.ak_public_pem.encode())
            fingerprint = parsed.ak_fingerprint
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise InvalidInput(f"enrolment record: {exc}") from None
        if not isinstance(ak, ec.EllipticCurvePublicKey):
            raise InvalidInput("enrolment record: the attestation key must be an ECC (P-256) key")
        now = self.clock.now()
        with self.db.write() as session:
            key = self._trusted_key(session, release_public_key)
            if parsed.release_key_id != key_id(key):
                raise Conflict(
                    f"host {host} was enrolled with release key {parsed.release_key_id}, but the "
                    f"controller trusts {key_id(key)}; enrol it with the controller's release key"
                )
            row = session.get(EnrolmentRow, host)
            again = row is not None
            if row is None:
                row = EnrolmentRow(host_name=host)
                session.add(row)
            changed = again and row.ak_fingerprint != fingerprint
            row.record = parsed.to_dict()
            row.ak_fingerprint = fingerprint
            row.release_key_id = parsed.release_key_id
            row.enrolled_at = now
            host_row = _host(session, host)
            if host_row is not None and changed:  # a new TPM: old verdicts say nothing
                host_row.attestation_state = AttestationState.UNKNOWN
                host_row.attestation = unknown_verdict(
                    "enrolled again with a new attestation key", now, "re-enrolled"
                ).to_dict()
                host_row.attested_at = None
                host_row.min_release_version = 0
            events.record(
                session,
                now,
                "host.enrolled",
                f"host/{host}",
                f"host {host} enrolled{' again' if again else ''}: attestation key "
                f"{fingerprint} ({parsed.tpm_kind}), release key {parsed.release_key_id}",
                ak=fingerprint,
                tpm_kind=parsed.tpm_kind,
            )
            return row

    def enrolments(self) -> list[EnrolmentRow]:
        with self.db.read() as session:
            return list(session.scalars(select(EnrolmentRow).order_by(EnrolmentRow.host_name)))

    # -- releases ----------------------------------------------------------------------

    def publish(
        self, signed: Mapping[str, Any], release_public_key: str | None = None
    ) -> tuple[ReleaseRow, bool]:
        """Store a signed release manifest; the highest version is assigned to every host.
        Returns (row, created); publishing the very same manifest again changes nothing."""
        _plain_json(signed, "signed")
        try:
            manifest = SignedManifest.from_dict(signed)
        except TrustError as exc:
            raise InvalidInput(f"release manifest: {exc}") from None
        if manifest.manifest.stage != "release":
            raise InvalidInput(
                f"this is a {manifest.manifest.stage} manifest; stage-1 manifests are installed "
                "on each host (the loader config's stage1_manifest), only `release` manifests "
                "are published (fleetvisor release sign --stage release)"
            )
        now = self.clock.now()
        with self.db.write() as session:
            key = self._trusted_key(session, release_public_key)
            try:
                verify_manifest(manifest, key)
            except TrustError as exc:
                raise InvalidInput(f"release manifest refused: {exc}") from None
            version = manifest.manifest.version
            existing = session.get(ReleaseRow, version)
            if existing is not None:
                if existing.digest == manifest.digest():
                    return existing, False
                raise Conflict(
                    f"release version {version} is already published with other contents "
                    f"({existing.digest}); versions are sequence numbers: sign it as a new version"
                )
            highest = session.scalar(select(ReleaseRow.version).order_by(ReleaseRow.version.desc()))
            if highest is not None and version < highest:
                raise Conflict(
                    f"release version {version} is older than the published version {highest}; "
                    f"hosts refuse to go back (anti-rollback): sign it as version {highest + 1}"
                )
            row = ReleaseRow(
                version=version,
                label=manifest.manifest.label,
                digest=manifest.digest(),
                signed=manifest.to_dict(),
                published_at=now,
            )
            session.add(row)
            events.record(
                session,
                now,
                "release.published",
                f"release/{version}",
                f"release version {version} ({manifest.manifest.label or '-'}) published: "
                f"{len(manifest.manifest.components)} component(s), assigned to every host",
                digest=row.digest,
                components=dict(manifest.manifest.components),
            )
            return row, True

    def releases(self) -> list[ReleaseRow]:
        with self.db.read() as session:
            return list(session.scalars(select(ReleaseRow).order_by(ReleaseRow.version)))

    def assigned_release(self, host: str) -> ReleaseRow | None:
        """The release `host` must boot: the highest published version (one rollout line).
        Remembered as handed to the host, which is then held to it until its next boot."""
        with self.db.write() as session:
            release = _latest_release(session)
            enrolment = session.get(EnrolmentRow, host)
            if release is not None and enrolment is not None:
                enrolment.release_version = release.version
            return release

    # -- state -------------------------------------------------------------------------

    def status(self, host: str) -> dict[str, Any]:
        """A host's standing, its last verdict and what it is compared against."""
        with self.db.read() as session:
            row = _host(session, host)
            enrolment = session.get(EnrolmentRow, host)
            if row is None and enrolment is None:
                raise NotFound(f"host {host!r} is neither registered nor enrolled")
            release = _latest_release(session)
            verdict = (row.attestation if row else {}) or {}
            if row is None:
                verdict = unknown_verdict(
                    "enrolled, not registered yet: start its agent with --measured-boot",
                    self.clock.now(),
                    reason="not-registered",
                ).to_dict()
            elif enrolment is None:
                verdict = unknown_verdict(
                    "not enrolled: enrol it (fleetvisor host enroll) to attest it",
                    self.clock.now(),
                    reason="not-enrolled",
                ).to_dict()
            return {
                "host": host,
                "registered": row is not None,
                "enrolled": enrolment is not None,
                "state": row.attestation_state if row else AttestationState.UNKNOWN.value,
                "reason": verdict.get("reason", "no-evidence"),
                "message": verdict.get("message", ""),
                "verdict": verdict,
                "attested_at": row.attested_at if row else None,
                "min_release_version": row.min_release_version if row else 0,
                "ak_fingerprint": enrolment.ak_fingerprint if enrolment else None,
                "assigned_release": release.version if release else None,
                "booted_release": enrolment.release_version if enrolment else None,
            }

    # -- challenges --------------------------------------------------------------------

    def issue_nonce(self, host: str) -> bytes:
        """A single-use nonce for a host that answers later (its boot step's report)."""
        self._require_enrolled(host)
        with self._nonce_lock:
            return self.nonces.issue(host)

    def submit(
        self,
        host: str,
        nonce: bytes,
        evidence: Mapping[str, Any],
        refusal: Mapping[str, str] | None = None,
    ) -> Verdict:
        """Verify evidence a host sent for a nonce it fetched; record and return the verdict."""
        _plain_json(evidence, "evidence")
        _plain_json(dict(refusal or {}), "refusal")
        self._require_enrolled(host)
        with self._nonce_lock:
            fresh = self.nonces.redeem(host, nonce)
        now = self.clock.now()
        if not fresh:
            verdict = Verdict(
                AttestationState.UNTRUSTED,
                "stale-nonce",
                f"the evidence answers nonce {nonce.hex()[:16]}…, which this controller did not "
                "issue to this host, already used, or let expire: a replayed or stale quote",
                [Finding("stale-nonce", "nonce not issued, used or expired", measured=nonce.hex())],
                checked_at=now,
            )
        else:
            verdict = self._verify(host, nonce, evidence, now)
        self._record(host, verdict, refusal)
        return verdict

    def _require_enrolled(self, host: str) -> None:
        with self.db.read() as session:
            if session.get(EnrolmentRow, host) is None:
                raise NotFound(
                    f"host {host!r} is not enrolled; enrol it first (fleetvisor host enroll)"
                )

    async def challenge(self, host: str) -> Verdict:
        """Challenge the host's agent now with a fresh nonce; record and return the verdict."""
        now = self.clock.now()
        with self.db.read() as session:
            row = _host(session, host)
            enrolled = session.get(EnrolmentRow, host) is not None
        if row is None:
            raise NotFound(f"host {host!r} is not registered; its agent registers when it starts")
        if not enrolled:
            verdict = unknown_verdict(
                f"host {host} is not enrolled: enrol it (fleetvisor host enroll) to attest it",
                now,
                reason="not-enrolled",
            )
            self._record(host, verdict)
            return verdict
        client = self.clients.for_host(row.name, row.agent_url, row.agent_token)
        with self._nonce_lock:
            nonce = self.nonces.issue(host)
        try:
            if not isinstance(client, Attester):
                raise DriverError("this agent cannot answer attestation challenges")
            evidence = await client.attest(nonce)
        except AgentUnreachable as exc:
            verdict = unknown_verdict(
                f"host {host} did not answer the challenge: {exc}", self.clock.now(), "unreachable"
            )
        except DriverError as exc:
            verdict = Verdict(
                AttestationState.UNTRUSTED,
                "no-evidence",
                f"host {host} is enrolled but its agent gave no boot evidence ({exc}); start "
                "it with --measured-boot",
                [Finding("no-evidence", str(exc))],
                checked_at=self.clock.now(),
            )
        else:
            with self._nonce_lock:
                fresh = self.nonces.redeem(host, nonce)
            if fresh:
                verdict = self._verify(host, nonce, evidence, self.clock.now())
            else:
                verdict = unknown_verdict(
                    f"host {host} answered after the nonce expired", self.clock.now(), "timeout"
                )
        self._record(host, verdict)
        return verdict

    async def run_forever(self) -> None:
        """Challenge enrolled hosts: soon after they register, then every interval."""
        limit = asyncio.Semaphore(CHALLENGE_CONCURRENCY)

        async def one(name: str) -> None:
            async with limit:
                try:
                    await self.challenge(name)
                except Exception:  # one host's failure must not stop the others
                    log.exception("attestation of %s failed", name)

        while True:
            try:
                due = self.due()
                if due:
                    await asyncio.gather(*(one(name) for name in due))
            except Exception:  # keep attesting: one bad tick must not end the loop
                log.exception("attestation round failed")
            await self.clock.sleep(self.settings.attestation_poll_interval)

    def due(self) -> list[str]:
        """Enrolled hosts that are up and not attested since registering or for an interval
        (sooner when the last challenge got no answer)."""
        now = self.clock.now()
        cutoff = now - self.settings.attestation_interval
        retry = now - min(UNANSWERED_RETRY, self.settings.attestation_interval)
        with self.db.read() as session:
            rows = session.execute(
                select(HostRow.name, HostRow.attested_at, HostRow.attestation_state)
                .join(EnrolmentRow, EnrolmentRow.host_name == HostRow.name)
                .where(HostRow.state != HostState.DOWN)
            ).all()
        return sorted(
            name
            for name, at, state in rows
            if at is None or at <= cutoff or (state == AttestationState.UNKNOWN and at <= retry)
        )

    # -- verification and recording ----------------------------------------------------

    def _verify(self, host: str, nonce: bytes, evidence: Mapping[str, Any], now: float) -> Verdict:
        with self.db.read() as session:
            enrolment = session.get(EnrolmentRow, host)
            row = _host(session, host)
            release = _handed_release(session, enrolment)
            key_row = session.get(SettingRow, RELEASE_KEY_SETTING)
        if enrolment is None:
            return unknown_verdict(f"host {host} is not enrolled", now, "not-enrolled")
        if key_row is None:
            return unknown_verdict(
                "the controller has no release public key to verify with; publish a release "
                "with --public-key",
                now,
                "no-release-key",
            )
        return verify_evidence(
            evidence,
            enrolment=EnrolmentRecord.from_dict(enrolment.record),
            nonce=nonce,
            release_public_key=load_public_key(key_row.value.encode()),
            expected_release=SignedManifest.from_dict(release.signed) if release else None,
            min_release_version=row.min_release_version if row else 0,
            now=now,
        )

    def _record(
        self, host: str, verdict: Verdict, refusal: Mapping[str, str] | None = None
    ) -> None:
        """Store the verdict on the host (if registered) and log what changed."""
        now = self.clock.now()
        data = verdict.to_dict()
        with self.db.write() as session:
            if refusal:
                detail = {k: str(refusal.get(k, "")) for k in REFUSAL_FIELDS}
                events.record(
                    session,
                    now,
                    "host.boot_refused",
                    f"host/{host}",
                    f"host {host} refused to boot in phase {detail['phase'] or '?'}: "
                    f"{detail['component']}: {detail['reason']} (expected {detail['expected']}, "
                    f"measured {detail['measured']})",
                    **detail,
                )
            row = _host(session, host)
            previous = (
                (row.attestation_state, (row.attestation or {}).get("reason")) if row else None
            )
            if row is not None:
                row.attestation_state = verdict.state.value
                row.attestation = data
                row.attested_at = now
                version = verdict.summary.get("release_version")
                if verdict.trusted and isinstance(version, int):
                    row.min_release_version = max(row.min_release_version, version)
            if previous == (verdict.state.value, verdict.reason):
                return  # periodic answers that change nothing stay out of the event log
            kind = {
                AttestationState.TRUSTED: "host.trusted",
                AttestationState.UNTRUSTED: "host.untrusted",
            }.get(verdict.state, "host.attestation_unknown")
            first = verdict.findings[0] if verdict.findings else None
            events.record(
                session,
                now,
                kind,
                f"host/{host}",
                f"host {host} is {verdict.state}: {verdict.message}",
                reason=verdict.reason,
                component=first.component if first else "",
                expected=first.expected if first else "",
                measured=first.measured if first else "",
                findings=[f.to_dict() for f in verdict.findings],
            )


def _host(session: Session, name: str) -> HostRow | None:
    return session.scalar(select(HostRow).where(HostRow.name == name))


def _handed_release(session: Session, enrolment: EnrolmentRow | None) -> ReleaseRow | None:
    """The release the host was handed at its last boot (publishing a newer one does not
    make running hosts fail: they move to it at their next boot), else the newest."""
    if enrolment is not None and enrolment.release_version is not None:
        handed = session.get(ReleaseRow, enrolment.release_version)
        if handed is not None:
            return handed
    return _latest_release(session)


def _latest_release(session: Session) -> ReleaseRow | None:
    return session.scalar(select(ReleaseRow).order_by(ReleaseRow.version.desc()).limit(1))


def _public_key(pem: str) -> Ed25519PublicKey:
    try:
        return load_public_key(pem.encode())
    except (TrustError, ValueError, UnicodeEncodeError) as exc:
        raise InvalidInput(
            f"release_public_key: {exc}; pass the Ed25519 public key PEM (release.pub)"
        ) from None


def _plain_json(value: Any, what: str) -> None:
    """Refuse what the store cannot keep: text with NUL or without a UTF-8 form."""
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False)
        text.encode()
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"{what} must be plain JSON text: {exc}") from None
    if "\x00" in text or "\\u0000" in text:
        raise InvalidInput(f"{what} must not contain NUL characters")


def _plain_text(value: str, what: str) -> str:
    _plain_json(value, what)
    return value
