"""The controller's verdict on crafted evidence: every reason a host is (un)trusted.

Evidence is built over the in-memory TPM model, whose quotes have exactly the bytes a
TPM produces, so the verifier runs unchanged; each test bends one thing.
"""

from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass, field

import pytest

from fleetvisor.clock import VirtualClock
from fleetvisor.trust.attest import (
    AttestationState,
    Evidence,
    NonceBook,
    Verdict,
    make_evidence,
    unknown_verdict,
    verify_evidence,
)
from fleetvisor.trust.config import PcrMap, TpmLayout
from fleetvisor.trust.encoding import canonical_json, sha256_digest
from fleetvisor.trust.enrol import EnrolmentRecord, enrol_host
from fleetvisor.trust.errors import EnrolmentRecordInvalid
from fleetvisor.trust.manifest import (
    Manifest,
    SignedManifest,
    generate_signing_key,
    key_id,
    sign_manifest,
)
from fleetvisor.trust.measure import REFUSAL_COMPONENT, EventLog, MeasurementEvent
from fleetvisor.trust.sim import SimulatedTpm
from fleetvisor.trust.tpm_structs import StructureError, parse_attest, parse_signature

KEY = generate_signing_key()
STAGE1_COMPONENTS = {
    "loader-config": sha256_digest(b"config"),
    "agent-code": sha256_digest(b"code"),
    "driver:runc": sha256_digest(b"runc"),
}
STAGE1 = sign_manifest(Manifest("stage1", 1, "s1", STAGE1_COMPONENTS), KEY)
RELEASES = {
    v: sign_manifest(
        Manifest("release", v, f"v{v}", {"coordinator": sha256_digest(f"coord{v}".encode())}), KEY
    )
    for v in (2, 3, 4)
}
LAYOUT = TpmLayout()


@dataclass
class Booted:
    """A host's TPM after a (crafted) boot, and what it would answer with."""

    tpm: SimulatedTpm
    enrolment: EnrolmentRecord
    log: EventLog
    manifests: list[SignedManifest] = field(default_factory=list)

    def answer(self, nonce: bytes) -> Evidence:
        return make_evidence(
            self.tpm,
            nonce=nonce,
            log=self.log,
            manifests=self.manifests,
            pcrs=PcrMap(),
            ak_handle=LAYOUT.ak_handle,
        )

    def verdict(
        self,
        *,
        expected: SignedManifest | None = RELEASES[3],
        evidence: Evidence | dict[str, object] | None = None,
        nonce: bytes | None = None,
        **options: object,
    ) -> Verdict:
        nonce = nonce or secrets.token_bytes(32)
        return verify_evidence(
            evidence if evidence is not None else self.answer(nonce).to_dict(),
            enrolment=self.enrolment,
            nonce=nonce,
            release_public_key=KEY.public_key(),
            expected_release=expected,
            **options,  # type: ignore[arg-type]
        )


def boot(
    *,
    stage1: SignedManifest = STAGE1,
    release: SignedManifest | None = RELEASES[3],
    measured: dict[str, str] | None = None,
    anchor: str | None = None,
    refusal: dict[str, str] | None = None,
    send: list[SignedManifest] | None = None,
) -> Booted:
    """Extend a crafted, truthful log into a fresh enrolled TPM. `measured` overrides
    component digests (as if the files differed)."""
    tpm = SimulatedTpm()
    enrolment = enrol_host(tpm, KEY.public_key(), tpm_kind="sim")
    digests = {**STAGE1_COMPONENTS, **(release.manifest.components if release else {})}
    digests.update(measured or {})
    events = [
        MeasurementEvent(12, "root", "release-public-key", anchor or key_id(KEY.public_key())),
        MeasurementEvent(12, "stage1", "manifest", stage1.digest()),
        MeasurementEvent(12, "stage1", "loader-config", digests["loader-config"]),
        MeasurementEvent(13, "stage1", "agent-code", digests["agent-code"], "/opt/fleetvisor"),
        MeasurementEvent(13, "stage1", "driver:runc", digests["driver:runc"], "/usr/sbin/runc"),
    ]
    if release is not None:
        events.append(MeasurementEvent(14, "release", "manifest", release.digest()))
        events += [
            MeasurementEvent(14, "release", name, digests[name])
            for name in release.manifest.components
        ]
    for name, digest in (measured or {}).items():
        if name not in {e.component for e in events}:
            events.append(MeasurementEvent(14, "release", name, digest))
    if refusal is not None:
        detail = canonical_json(refusal)
        events.append(
            MeasurementEvent(
                14, "release", REFUSAL_COMPONENT, sha256_digest(detail), detail.decode()
            )
        )
    tpm.pcr_extend([(e.pcr, e.extend_value()) for e in events])
    manifests = send if send is not None else [stage1] + ([release] if release else [])
    return Booted(tpm, enrolment, EventLog(events), manifests)


def test_a_clean_boot_is_trusted_with_its_evidence_summarised() -> None:
    verdict = boot().verdict()
    assert verdict.state is AttestationState.TRUSTED and verdict.reason == "ok"
    assert verdict.findings == []
    summary = verdict.summary
    assert (summary["stage1_version"], summary["release_version"]) == (1, 3)
    assert summary["components"]["stage1"]["agent-code"] == STAGE1_COMPONENTS["agent-code"]
    assert set(summary["pcrs"]) == {"12", "13", "14"}
    assert verdict.to_dict()["state"] == "trusted"


def test_any_release_is_accepted_when_none_is_assigned() -> None:
    assert boot().verdict(expected=None).trusted
    assert boot(release=None).verdict(expected=None).trusted


def test_a_replayed_quote_is_stale() -> None:
    host = boot()
    old_nonce = secrets.token_bytes(32)
    old = host.answer(old_nonce).to_dict()
    assert host.verdict(evidence=old, nonce=old_nonce).trusted
    verdict = host.verdict(evidence=old)  # a new challenge, answered with the old quote
    assert (verdict.state, verdict.reason) == (AttestationState.UNTRUSTED, "stale-nonce")
    assert verdict.findings[0].measured == old_nonce.hex()


def test_a_quote_from_another_tpm_is_refused() -> None:
    host, impostor = boot(), boot()
    nonce = secrets.token_bytes(32)
    verdict = host.verdict(evidence=impostor.answer(nonce).to_dict(), nonce=nonce)
    assert verdict.reason == "quote-signature"


def test_a_changed_quote_message_breaks_the_signature() -> None:
    host = boot()
    nonce = secrets.token_bytes(32)
    evidence = host.answer(nonce)
    message = bytearray(evidence.quote_message)
    message[-1] ^= 1
    forged = dataclasses.replace(evidence, quote_message=bytes(message))
    assert host.verdict(evidence=forged.to_dict(), nonce=nonce).reason == "quote-signature"


def test_pcr_values_other_than_the_quoted_ones() -> None:
    host = boot()
    nonce = secrets.token_bytes(32)
    evidence = host.answer(nonce)
    forged = dataclasses.replace(evidence, pcr_values={**evidence.pcr_values, 13: bytes(32)})
    assert host.verdict(evidence=forged.to_dict(), nonce=nonce).reason == "pcr-digest"


def test_a_quote_that_leaves_out_a_pcr() -> None:
    host = boot()
    nonce = secrets.token_bytes(32)
    quote = host.tpm.quote(LAYOUT.ak_handle, [12, 13], nonce)
    evidence = dataclasses.replace(
        host.answer(nonce),
        quote_message=quote.message,
        quote_signature=quote.signature,
        pcr_values=quote.pcr_values,
    )
    assert host.verdict(evidence=evidence.to_dict(), nonce=nonce).reason == "pcr-selection"


def test_an_edited_event_log_does_not_replay() -> None:
    host = boot(measured={"agent-code": sha256_digest(b"evil")})
    claimed = STAGE1_COMPONENTS["agent-code"]  # the host claims the expected digest
    host.log.events[3] = dataclasses.replace(host.log.events[3], digest=claimed)
    verdict = host.verdict()
    assert verdict.reason == "log-replay"
    assert verdict.findings[0].component == "pcr:13"


def test_a_pcr_that_did_not_start_at_zero() -> None:
    host = boot()
    start = bytes(range(32))  # e.g. the chain already ran once since the TPM's reset
    host.log.baselines[13] = start.hex()
    host.tpm.pcrs[13] = host.log.replay([13])[13]  # log and TPM agree on that start
    assert host.verdict().reason == "baseline"
    host.enrolment = dataclasses.replace(host.enrolment, allowed_baselines={13: [start.hex()]})
    assert host.verdict().trusted


def test_a_changed_component_is_named_with_both_digests() -> None:
    evil = sha256_digest(b"evil runc")
    verdict = boot(measured={"driver:runc": evil}).verdict()
    assert verdict.reason == "component-mismatch"
    finding = verdict.findings[0]
    assert (finding.component, finding.expected, finding.measured) == (
        "driver:runc",
        STAGE1_COMPONENTS["driver:runc"],
        evil,
    )
    assert "/usr/sbin/runc" in finding.message


def test_release_components_unlisted_or_missing() -> None:
    unlisted = boot(measured={"backdoor": sha256_digest(b"x")}).verdict()
    assert unlisted.reason == "component-unlisted"
    host = boot()
    kept = [e for e in host.log.events if e.component != "coordinator"]
    host.tpm.power_cycle()
    host.tpm.pcr_extend([(e.pcr, e.extend_value()) for e in kept])
    host.log = EventLog(kept)
    assert host.verdict().reason == "component-missing"


def test_a_manifest_signed_by_another_key() -> None:
    foreign = sign_manifest(STAGE1.manifest, generate_signing_key())
    verdict = boot(stage1=foreign).verdict()
    assert verdict.reason == "manifest-signature"
    assert verdict.findings[0].measured == foreign.key_id


def test_a_manifest_the_host_did_not_send() -> None:
    assert boot(send=[STAGE1]).verdict().reason == "manifest-missing"


def test_rollback_against_the_assignment_or_the_controllers_memory() -> None:
    old = boot(release=RELEASES[2])
    verdict = old.verdict(expected=RELEASES[3])
    assert verdict.reason == "rollback"
    assert (verdict.findings[0].expected, verdict.findings[0].measured) == (
        "version >= 3",
        "version 2",
    )
    assert old.verdict(expected=None, min_release_version=3).reason == "rollback"
    assert old.verdict(expected=None, min_release_version=2).trusted


def test_a_different_release_than_assigned() -> None:
    verdict = boot(release=RELEASES[4]).verdict(expected=RELEASES[3])
    assert verdict.reason == "release-mismatch"


def test_a_boot_that_stopped_before_the_release() -> None:
    assert boot(release=None).verdict().reason == "incomplete-boot"


def test_a_release_key_other_than_the_enrolled_one() -> None:
    swapped = boot(anchor=sha256_digest(b"attacker key"))
    verdict = swapped.verdict()
    assert verdict.reason == "trust-anchor"
    assert verdict.findings[0].component == "release-public-key"
    other_controller_key = verify_evidence(
        boot().answer(nonce := secrets.token_bytes(32)).to_dict(),
        enrolment=boot().enrolment,
        nonce=nonce,
        release_public_key=generate_signing_key().public_key(),
    )
    assert other_controller_key.reason == "trust-anchor"


def test_a_refusal_recorded_by_the_loader() -> None:
    refusal = {
        "component": "manifest",
        "expected": "version >= 3",
        "measured": "version 2",
        "reason": "rollback",
        "phase": "release",
    }
    verdict = boot(refusal=refusal).verdict()
    assert verdict.reason == "boot-refused"
    finding = verdict.findings[0]
    assert (finding.component, finding.expected, finding.measured) == (
        "manifest",
        "version >= 3",
        "version 2",
    )
    assert verdict.summary["refusal_reason"] == "rollback"


@pytest.mark.parametrize(
    "mangle",
    [
        lambda d: d.pop("quote"),
        lambda d: d.update(format="other/1"),
        lambda d: d["quote"].update(message="***"),
        lambda d: d["quote"]["pcrs"].update({"12": "00"}),
        lambda d: d["event_log"]["events"].append({"pcr": 12}),
        lambda d: d["manifests"].append({"manifest": {}}),
    ],
)
def test_malformed_evidence_is_untrusted_not_an_error(mangle: object) -> None:
    host = boot()
    nonce = secrets.token_bytes(32)
    data = host.answer(nonce).to_dict()
    mangle(data)  # type: ignore[operator]
    verdict = host.verdict(evidence=data, nonce=nonce)
    assert (verdict.state, verdict.reason) == (AttestationState.UNTRUSTED, "evidence-malformed")


def test_evidence_and_enrolment_round_trip_through_json() -> None:
    host = boot()
    evidence = host.answer(secrets.token_bytes(32))
    assert Evidence.from_dict(evidence.to_dict()) == evidence
    assert EnrolmentRecord.from_dict(host.enrolment.to_dict()) == host.enrolment
    with pytest.raises(EnrolmentRecordInvalid, match="counter_base"):
        EnrolmentRecord.from_dict({**host.enrolment.to_dict(), "counter_base": -1})


def test_unknown_verdict_for_hosts_without_evidence() -> None:
    verdict = unknown_verdict("host was never enrolled", now=5.0, reason="not-enrolled")
    assert verdict.state is AttestationState.UNKNOWN and not verdict.trusted


def test_quote_structures_refuse_garbage() -> None:
    quote = boot().tpm.quote(LAYOUT.ak_handle, [12], b"nonce")
    assert parse_attest(quote.message).extra_data == b"nonce"
    with pytest.raises(StructureError, match="magic"):
        parse_attest(b"\0" * len(quote.message))
    with pytest.raises(StructureError, match="truncated"):
        parse_attest(quote.message[:20])
    with pytest.raises(StructureError, match="trailing"):
        parse_attest(quote.message + b"\0")
    with pytest.raises(StructureError, match="neither"):
        parse_signature(b"\x00\x01\x00\x0b")


async def test_nonce_book_issues_single_use_expiring_nonces() -> None:
    clock = VirtualClock()
    book = NonceBook(clock, ttl=60)
    first, second = book.issue("h1"), book.issue("h1")
    assert first != second and len(first) == 32
    assert book.redeem("h1", first)
    assert not book.redeem("h1", first)  # single use
    assert not book.redeem("h2", second)  # another host's
    await clock.advance(61)
    assert not book.redeem("h1", second)  # expired
