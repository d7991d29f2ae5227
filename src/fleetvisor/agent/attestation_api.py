"""The agent's answer to an attestation challenge: POST /v1/attestation {nonce} -> evidence.

The controller calls it with the agent's token at registration and periodically. The
evidence comes from the measured boot this process ran (`app.state.measured_boot`,
an agent.boot.MeasuredBoot); an agent started without --measured-boot answers 409.
"""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, StringConstraints

from fleetvisor.errors import Conflict, Unauthorized

bearer = HTTPBearer(auto_error=False)


class ChallengeIn(BaseModel):
    nonce: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


def attestation_router(token: str) -> APIRouter:
    def authorized(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        given = credentials.credentials if credentials else ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise Unauthorized("only the controller may call this agent")

    router = APIRouter(dependencies=[Depends(authorized)])

    @router.post("/v1/attestation")
    async def attest(request: Request, body: ChallengeIn) -> dict[str, Any]:
        """A TPM quote over the nonce, with the boot's event log and signed manifests."""
        boot = getattr(request.app.state, "measured_boot", None)
        if boot is None:
            raise Conflict(
                "this agent was started without --measured-boot: it has no boot evidence"
            )
        evidence: dict[str, Any] = await boot.attest(bytes.fromhex(body.nonce))
        return evidence

    return router
