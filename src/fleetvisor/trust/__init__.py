"""Measured boot and remote attestation of the host agent, rooted in a TPM 2.0.

Agent side:      open_host_tpm -> measured_boot (or run_stage1 + run_release) -> make_evidence
Operator, once:  enrol_host -> EnrolmentRecord (stored by the controller)
Controller side: NonceBook / a fresh nonce -> verify_evidence -> Verdict (AttestationState)
Releases:        Manifest -> sign_manifest -> SignedManifest

See README.md in this directory for the phases, the PCR map and the threat model.
"""

from fleetvisor.trust.attest import (
    AttestationState,
    Evidence,
    Finding,
    NonceBook,
    Verdict,
    make_evidence,
    unknown_verdict,
    verify_evidence,
)
from fleetvisor.trust.boot import (
    BootResult,
    ReleaseBundle,
    Stage1Result,
    measured_boot,
    run_release,
    run_stage1,
)
from fleetvisor.trust.config import LoaderConfig, PcrMap, TpmLayout
from fleetvisor.trust.enrol import EnrolmentRecord, enrol_host
from fleetvisor.trust.errors import (
    BootRefused,
    ConfigInvalid,
    EnrolmentError,
    EnrolmentRecordInvalid,
    EvidenceMalformed,
    ManifestInvalid,
    SwtpmError,
    ToolsMissing,
    TpmError,
    TrustError,
)
from fleetvisor.trust.host import HostTpm, open_host_tpm
from fleetvisor.trust.manifest import (
    Manifest,
    SignedManifest,
    generate_signing_key,
    key_id,
    load_public_key,
    sign_manifest,
    verify_manifest,
)
from fleetvisor.trust.measure import EventLog, MeasurementEvent, digest_path

__all__ = [
    "AttestationState",
    "BootRefused",
    "BootResult",
    "ConfigInvalid",
    "EnrolmentError",
    "EnrolmentRecord",
    "EnrolmentRecordInvalid",
    "EventLog",
    "Evidence",
    "EvidenceMalformed",
    "Finding",
    "HostTpm",
    "LoaderConfig",
    "Manifest",
    "ManifestInvalid",
    "MeasurementEvent",
    "NonceBook",
    "PcrMap",
    "ReleaseBundle",
    "SignedManifest",
    "Stage1Result",
    "SwtpmError",
    "ToolsMissing",
    "TpmError",
    "TpmLayout",
    "TrustError",
    "Verdict",
    "digest_path",
    "enrol_host",
    "generate_signing_key",
    "key_id",
    "load_public_key",
    "make_evidence",
    "measured_boot",
    "open_host_tpm",
    "run_release",
    "run_stage1",
    "sign_manifest",
    "unknown_verdict",
    "verify_evidence",
    "verify_manifest",
]
