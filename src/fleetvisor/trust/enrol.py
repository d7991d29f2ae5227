"""Enrolment: done once per host by an operator, before the host first boots into the fleet.

    enrol_host(tpm, release public key)
      1. endorsement key (EK), persistent        -- the TPM's identity
      2. attestation key (AK) under the EK,      -- signs quotes; its private half
         persistent                                 never leaves the TPM
      3. rollback counter: defined, initialised  -- its first value becomes the base
      4. release key index: key || base, then    -- the key boot verifies manifests
         write-locked                               with; cannot be swapped on disk
      5. (optional) owner authorization set      -- then only its holder can undefine
      -> EnrolmentRecord: public data the controller stores for the host

Every step is idempotent: enrolling again with the same release key returns the same
record; a different key is refused (re-keying is an explicit owner action).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fleetvisor.trust.config import PcrMap, TpmLayout
from fleetvisor.trust.encoding import is_digest, sha256_digest
from fleetvisor.trust.errors import ConfigInvalid, EnrolmentRecordInvalid
from fleetvisor.trust.nv import ensure_counter, write_trust_anchor
from fleetvisor.trust.tpm import Tpm

RECORD_FORMAT = "fleetvisor-enrolment/1"


@dataclass(frozen=True)
class EnrolmentRecord:
    """What the controller keeps per host: all public, none of it secret.

    `allowed_baselines` lists, per PCR, starting values other than zero that the
    verifier accepts (for a real TPM whose platform firmware extends those PCRs).
    """

    ek_public_pem: str
    ak_public_pem: str
    ak_name: str
    release_key_id: str
    counter_base: int
    tpm_kind: str = "swtpm"
    layout: TpmLayout = field(default_factory=TpmLayout)
    pcrs: PcrMap = field(default_factory=PcrMap)
    allowed_baselines: Mapping[int, list[str]] = field(default_factory=dict)

    @property
    def ak_fingerprint(self) -> str:
        """`sha256:` of the AK's DER SubjectPublicKeyInfo: a short name for the key."""
        key = serialization.load_pem_public_key(self.ak_public_pem.encode())
        der = key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return sha256_digest(der)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": RECORD_FORMAT,
            "ek_public_pem": self.ek_public_pem,
            "ak_public_pem": self.ak_public_pem,
            "ak_name": self.ak_name,
            "release_key_id": self.release_key_id,
            "counter_base": self.counter_base,
            "tpm_kind": self.tpm_kind,
            "layout": self.layout.to_dict(),
            "pcrs": self.pcrs.to_dict(),
            "allowed_baselines": {
                str(pcr): list(values) for pcr, values in sorted(self.allowed_baselines.items())
            },
        }

    @classmethod
    def from_dict(cls, data: Any) -> EnrolmentRecord:
        """Parse a stored or submitted record; EnrolmentRecordInvalid (a 422) naming the field."""
        if not isinstance(data, Mapping) or data.get("format") != RECORD_FORMAT:
            raise EnrolmentRecordInvalid(f'an enrolment record needs "format": "{RECORD_FORMAT}"')
        for key in ("ek_public_pem", "ak_public_pem", "ak_name", "tpm_kind"):
            if not isinstance(data.get(key), str):
                raise EnrolmentRecordInvalid(f"enrolment record: {key} must be a string")
        if not is_digest(data.get("release_key_id")):
            raise EnrolmentRecordInvalid("enrolment record: release_key_id must be sha256:<hex>")
        base = data.get("counter_base")
        if not isinstance(base, int) or isinstance(base, bool) or base < 0:
            raise EnrolmentRecordInvalid("enrolment record: counter_base must be an integer >= 0")
        try:
            serialization.load_pem_public_key(str(data["ak_public_pem"]).encode())
            layout = TpmLayout.from_dict(data.get("layout", {}))
            pcrs = PcrMap.from_dict(data.get("pcrs", {}))
        except (ValueError, ConfigInvalid) as exc:
            raise EnrolmentRecordInvalid(f"enrolment record: {exc}") from None
        baselines: dict[int, list[str]] = {}
        raw = data.get("allowed_baselines", {})
        if not isinstance(raw, Mapping):
            raise EnrolmentRecordInvalid("enrolment record: allowed_baselines must be an object")
        for pcr, values in raw.items():
            if not str(pcr).isdigit() or not isinstance(values, list):
                raise EnrolmentRecordInvalid(
                    "enrolment record: allowed_baselines maps a PCR number to a list of hex values"
                )
            baselines[int(pcr)] = [str(v).lower() for v in values]
        return cls(
            ek_public_pem=str(data["ek_public_pem"]),
            ak_public_pem=str(data["ak_public_pem"]),
            ak_name=str(data["ak_name"]),
            release_key_id=str(data["release_key_id"]),
            counter_base=base,
            tpm_kind=str(data["tpm_kind"]),
            layout=layout,
            pcrs=pcrs,
            allowed_baselines=baselines,
        )


def enrol_host(
    session: Tpm,
    release_public_key: Ed25519PublicKey,
    *,
    layout: TpmLayout | None = None,
    pcrs: PcrMap | None = None,
    tpm_kind: str = "swtpm",
    new_owner_auth: str | None = None,
) -> EnrolmentRecord:
    """Provision the TPM for measured boot and return the record for the controller.

    `session` must carry the current owner authorization if one is set. With
    `new_owner_auth`, the owner authorization is changed last (keep it offline: boots
    never need it)."""
    layout = layout or TpmLayout()
    handles = session.persistent_handles()
    if layout.ek_handle in handles:
        ek_pem = session.read_public_pem(layout.ek_handle)
    else:
        ek_pem = session.create_ek(layout.ek_handle)
    if layout.ak_handle in handles:
        ak_pem, ak_name = (
            session.read_public_pem(layout.ak_handle),
            session.read_name(layout.ak_handle),
        )
    else:
        ak = session.create_ak(layout.ek_handle, layout.ak_handle)
        ak_pem, ak_name = ak.public_pem, ak.name
    if tpm_kind == "swtpm":
        # An agent that crashes leaves its swtpm powered off disorderly, which a TPM
        # counts as a dictionary-attack failure once a key was used; swtpm's defaults
        # (3 tries, 1000 s recovery) would lock the AK out after three crashes. The AK
        # has no password to guess, so be forgiving: 32 tries, one forgiven per minute.
        session.set_lockout_parameters(max_tries=32, recovery_s=60, lockout_recovery_s=600)
    first_value = ensure_counter(session, layout)
    anchor = write_trust_anchor(session, layout, release_public_key, first_value)
    if new_owner_auth is not None:
        session.set_owner_auth(new_owner_auth)
    return EnrolmentRecord(
        ek_public_pem=ek_pem,
        ak_public_pem=ak_pem,
        ak_name=ak_name,
        release_key_id=anchor.key_id,
        counter_base=anchor.counter_base,
        tpm_kind=tpm_kind,
        layout=layout,
        pcrs=pcrs or PcrMap(),
    )
