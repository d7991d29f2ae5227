"""Errors of the boot chain and attestation, each saying what happened and what to change.

`BootRefused` is the one the agent's boot step must act on: the host stops booting and
stays out of the fleet. It carries the component, the expected and the measured value,
so the event in the audit log is precise without a second look at the host.
"""

from __future__ import annotations

from typing import Any

from fleetvisor.errors import InvalidInput


class TrustError(Exception):
    """Base of every error raised by `fleetvisor.trust`."""


class TpmError(TrustError):
    """A TPM command failed or did not answer. Carries the tool's own words and a hint."""

    def __init__(self, command: str, detail: str, hint: str = "") -> None:
        message = f"`{command}` failed: {detail}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)
        self.command = command
        self.detail = detail
        self.hint = hint


class SwtpmError(TrustError):
    """The software TPM could not be started, reached or stopped."""


class ToolsMissing(TrustError):
    """swtpm or tpm2-tools are not installed; the message names the Debian packages."""


class ManifestInvalid(TrustError):
    """A release manifest is malformed, or its signature does not verify with the key given.

    `reason` is `malformed`, `wrong-key` (signed by another key than the trusted one) or
    `bad-signature` (the trusted key's id, but the signature does not verify).
    """

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


class EnrolmentError(TrustError):
    """Enrolling a host's TPM failed, or the TPM already holds a different enrolment."""


class ConfigInvalid(TrustError):
    """The loader configuration file is malformed or names a missing path."""


class EvidenceMalformed(InvalidInput):
    """Attestation evidence sent by a host cannot be parsed (a 422 if it reaches the API)."""


class EnrolmentRecordInvalid(InvalidInput):
    """An enrolment record (what the controller stores per host) cannot be parsed."""


class BootRefused(TrustError):
    """The measured boot stopped: a component did not match what the signed manifest says.

    `component` is the manifest's name for what failed ("agent-code", "driver:runc",
    "manifest", "release-public-key", ...); `expected` and `measured` are what the
    manifest (or TPM) said and what the loader found; `reason` is a short code
    (digest-mismatch, bad-signature, rollback, key-file-mismatch, ...).
    """

    def __init__(
        self,
        component: str,
        *,
        expected: str,
        measured: str,
        reason: str,
        phase: str,
        remedy: str = "",
    ) -> None:
        message = (
            f"measured boot refused in phase {phase}: {component}: {reason} "
            f"(expected {expected}, measured {measured})"
        )
        if remedy:
            message += f"; {remedy}"
        super().__init__(message)
        self.component = component
        self.expected = expected
        self.measured = measured
        self.reason = reason
        self.phase = phase
        self.remedy = remedy
        # The loader fills these in: what was measured (and extended) up to the refusal
        # and the signed manifests it read, so the host can still answer an attestation
        # challenge truthfully (an EventLog and a list of SignedManifest).
        self.event_log: Any = None
        self.manifests: list[Any] = []

    def as_event(self) -> dict[str, str]:
        """The refusal as a flat record for the audit log (and for the refusal measurement)."""
        return {
            "component": self.component,
            "expected": self.expected,
            "measured": self.measured,
            "reason": self.reason,
            "phase": self.phase,
        }
