"""Measured boot and attestation in the controller API (controller/attestation.py).

/v1/trust/enrolments                  a host's TPM enrolment (operator, once per host)
/v1/trust/releases                    signed release manifests; the newest is assigned
/v1/trust/hosts/{name}                a host's attestation state and last verdict
/v1/trust/hosts/{name}/attest         challenge the host now
/v1/trust/hosts/{name}/release        the release the host must boot (its boot step asks)
/v1/trust/hosts/{name}/nonce          a nonce for evidence the host sends itself ...
/v1/trust/hosts/{name}/evidence       ... e.g. with the report of a refused boot

Routes under /hosts/{name}/ other than attest take the admin token (an agent's boot
step holds it before registering) or that host's own token.
"""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, Field, StringConstraints

from fleetvisor.api.auth import Admin, Credentials, controller_of
from fleetvisor.api.schemas import Name, ShortText
from fleetvisor.errors import Forbidden, NotFound, Unauthorized
from fleetvisor.model.specs import SafeStr
from fleetvisor.store.tables import EnrolmentRow, ReleaseRow
from fleetvisor.trust.attest import Verdict

PublicKeyPem = Annotated[SafeStr, StringConstraints(min_length=1, max_length=4096)]
NonceHex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
RefusalDetail = Annotated[
    dict[Annotated[SafeStr, StringConstraints(max_length=32)], ShortText], Field(max_length=16)
]


class EnrolIn(BaseModel):
    host: Name
    record: dict[str, Any] = Field(description="trust.EnrolmentRecord.to_dict() of the host")
    release_public_key: PublicKeyPem | None = Field(
        None, description="release public key PEM; sets the controller's key the first time"
    )


class EnrolmentOut(BaseModel):
    host: str
    ak_fingerprint: str
    release_key_id: str
    tpm_kind: str
    enrolled_at: float


class PublishIn(BaseModel):
    signed: dict[str, Any] = Field(description="a signed manifest of stage `release`")
    release_public_key: PublicKeyPem | None = None


class ReleaseOut(BaseModel):
    version: int
    label: str
    digest: str
    components: dict[str, str]
    published_at: float


class ReleaseDetail(ReleaseOut):
    signed: dict[str, Any]


class NonceOut(BaseModel):
    nonce: str
    expires_in: float


class EvidenceIn(BaseModel):
    nonce: NonceHex
    evidence: dict[str, Any]
    refusal: RefusalDetail | None = Field(
        None, description="the boot step's refusal: component, expected, measured, reason, phase"
    )


class VerdictOut(BaseModel):
    host: str
    state: str
    reason: str
    message: str
    findings: list[dict[str, str]]
    summary: dict[str, Any]
    checked_at: float


def own_host_or_admin(request: Request, name: str, credentials: Credentials) -> None:
    """The admin token, or the token of the host named in the path."""
    token = credentials.credentials if credentials else ""
    if not token:
        raise Unauthorized("send the admin token or this host's token as 'Authorization: Bearer'")
    controller = controller_of(request)
    if hmac.compare_digest(token.encode(), controller.admin_token.encode()):
        return
    host = controller.hosts.authenticate(token)
    if host is None:
        raise Unauthorized("the token is not valid; use the admin token or this host's token")
    if host.name != name:
        raise Forbidden(f"this token belongs to host {host.name}, not {name}")


OwnHostOrAdmin = Depends(own_host_or_admin)


def _enrolment_out(row: EnrolmentRow) -> EnrolmentOut:
    return EnrolmentOut(
        host=row.host_name,
        ak_fingerprint=row.ak_fingerprint,
        release_key_id=row.release_key_id,
        tpm_kind=str(row.record.get("tpm_kind", "")),
        enrolled_at=row.enrolled_at,
    )


def _release_out(row: ReleaseRow) -> ReleaseOut:
    return ReleaseOut(
        version=row.version,
        label=row.label,
        digest=row.digest,
        components=dict(row.signed.get("manifest", {}).get("components", {})),
        published_at=row.published_at,
    )


def _verdict_out(host: str, verdict: Verdict) -> VerdictOut:
    data = verdict.to_dict()
    return VerdictOut(host=host, **data)


def router() -> APIRouter:
    routes = APIRouter(prefix="/v1/trust", tags=["trust"])

    @routes.get("/enrolments", dependencies=[Admin])
    def list_enrolments(request: Request) -> list[EnrolmentOut]:
        return [_enrolment_out(row) for row in controller_of(request).attestation.enrolments()]

    @routes.post("/enrolments", dependencies=[Admin], status_code=201)
    def enrol(request: Request, body: EnrolIn) -> EnrolmentOut:
        """Register a host's TPM enrolment (`fleetvisor host enroll` on the host does this)."""
        row = controller_of(request).attestation.enrol(
            body.host, body.record, body.release_public_key
        )
        return _enrolment_out(row)

    @routes.get("/releases", dependencies=[Admin])
    def list_releases(request: Request) -> list[ReleaseOut]:
        """Published releases, oldest first; the last one is assigned to every host."""
        return [_release_out(row) for row in controller_of(request).attestation.releases()]

    @routes.post("/releases", dependencies=[Admin], status_code=201)
    def publish(request: Request, response: Response, body: PublishIn) -> ReleaseOut:
        """Publish a signed release manifest: hosts boot it at their next start."""
        row, created = controller_of(request).attestation.publish(
            body.signed, body.release_public_key
        )
        if not created:
            response.status_code = 200
        return _release_out(row)

    @routes.get("/hosts/{name}", dependencies=[Admin])
    def host_attestation(request: Request, name: str) -> dict[str, Any]:
        """The host's attestation state, its last verdict and the release it is held to."""
        return controller_of(request).attestation.status(name)

    @routes.post("/hosts/{name}/attest", dependencies=[Admin])
    async def attest_host(request: Request, name: str) -> VerdictOut:
        """Challenge the host now with a fresh nonce and record the verdict."""
        verdict = await controller_of(request).attestation.challenge(name)
        return _verdict_out(name, verdict)

    @routes.get("/hosts/{name}/release", dependencies=[OwnHostOrAdmin])
    def assigned_release(request: Request, name: str) -> ReleaseDetail:
        """The signed release manifest this host must boot (phase 3 of its measured boot)."""
        row = controller_of(request).attestation.assigned_release(name)
        if row is None:
            raise NotFound(
                "no release is published yet; publish one (fleetvisor release publish), or "
                "boot without phase 3"
            )
        return ReleaseDetail(**_release_out(row).model_dump(), signed=row.signed)

    @routes.post("/hosts/{name}/nonce", dependencies=[OwnHostOrAdmin])
    def issue_nonce(request: Request, name: str) -> NonceOut:
        """A single-use nonce for evidence the host sends itself (answer within expires_in)."""
        controller = controller_of(request)
        nonce = controller.attestation.issue_nonce(name)
        return NonceOut(nonce=nonce.hex(), expires_in=controller.settings.attestation_nonce_ttl)

    @routes.post("/hosts/{name}/evidence", dependencies=[OwnHostOrAdmin])
    def submit_evidence(request: Request, name: str, body: EvidenceIn) -> VerdictOut:
        """Verify evidence answering a nonce from /nonce; a refused boot reports itself here."""
        verdict = controller_of(request).attestation.submit(
            name, bytes.fromhex(body.nonce), body.evidence, body.refusal
        )
        return _verdict_out(name, verdict)

    return routes
