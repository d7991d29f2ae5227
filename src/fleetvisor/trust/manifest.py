"""Release manifests: which digest each component must have, signed with Ed25519.

A manifest says, for one release of the host software, `component name -> sha256`,
plus a `version` (a sequence number that only grows: anti-rollback compares it) and a
`stage`: `stage1` for what the first-stage loader checks (its configuration, the
first coordinator's code, the driver binaries) and `release` for what the first
coordinator may update to. The stage is signed too, so a stage-1 manifest can never be
passed off as a release.

The signature covers the canonical JSON of the manifest (see encoding.py) with the
format tag inside it; the envelope carries the signer's key id so a wrong key is
reported as such, not as a corrupt signature.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fleetvisor.trust.encoding import (
    b64decode,
    b64encode,
    canonical_json,
    is_digest,
    sha256_digest,
)
from fleetvisor.trust.errors import ManifestInvalid

MANIFEST_FORMAT = "fleetvisor-release/1"
STAGES = ("stage1", "release")
MAX_VERSION = 2**63 - 1
_COMPONENT = re.compile(r"[a-z0-9][a-z0-9._:-]{0,127}")


@dataclass(frozen=True)
class Manifest:
    """What one release consists of. `components` maps a name to `sha256:<hex>`."""

    stage: str
    version: int
    label: str
    components: Mapping[str, str]

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ManifestInvalid(f"manifest stage {self.stage!r} must be one of {STAGES}")
        if (
            not isinstance(self.version, int)
            or isinstance(self.version, bool)
            or not 0 <= self.version <= MAX_VERSION
        ):
            raise ManifestInvalid(
                f"manifest version {self.version!r} must be a non-negative integer "
                "(a release sequence number)"
            )
        if not isinstance(self.label, str) or len(self.label) > 128:
            raise ManifestInvalid("manifest label must be a string of at most 128 characters")
        if not isinstance(self.components, Mapping) or not self.components:
            raise ManifestInvalid("manifest must list at least one component")
        for name, digest in self.components.items():
            if not isinstance(name, str) or not _COMPONENT.fullmatch(name):
                raise ManifestInvalid(
                    f"component name {name!r} must be lowercase letters, digits and . _ : - "
                    "(at most 128 characters)"
                )
            if not is_digest(digest):
                raise ManifestInvalid(f"component {name}: {digest!r} is not sha256:<64 hex>")

    def body(self) -> dict[str, Any]:
        """The signed content, format tag included."""
        return {
            "format": MANIFEST_FORMAT,
            "stage": self.stage,
            "version": self.version,
            "label": self.label,
            "components": dict(sorted(self.components.items())),
        }

    def signed_bytes(self) -> bytes:
        return canonical_json(self.body())

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        if not isinstance(data, Mapping):
            raise ManifestInvalid("manifest must be a JSON object")
        if data.get("format") != MANIFEST_FORMAT:
            raise ManifestInvalid(
                f"manifest format {data.get('format')!r} is not {MANIFEST_FORMAT!r}"
            )
        extra = set(data) - {"format", "stage", "version", "label", "components"}
        if extra:
            raise ManifestInvalid(f"manifest has unknown fields: {', '.join(sorted(extra))}")
        components = data.get("components")
        if not isinstance(components, Mapping):
            raise ManifestInvalid("manifest components must be an object name -> digest")
        return cls(
            stage=data.get("stage"),  # type: ignore[arg-type]  # checked in __post_init__
            version=data.get("version"),  # type: ignore[arg-type]
            label=data.get("label", ""),
            components=dict(components),
        )


@dataclass(frozen=True)
class SignedManifest:
    """A manifest, its Ed25519 signature and the signer's key id (`sha256:` of the raw key)."""

    manifest: Manifest
    signature: bytes
    key_id: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "manifest": self.manifest.body(),
            "signature": b64encode(self.signature),
            "key_id": self.key_id,
        }

    def to_bytes(self) -> bytes:
        """Canonical JSON of the envelope: what is stored, sent and measured."""
        return canonical_json(self.to_dict())

    def digest(self) -> str:
        """`sha256:` of the canonical envelope: the value measured as the `manifest` event."""
        return sha256_digest(self.to_bytes())

    @classmethod
    def from_dict(cls, data: Any) -> SignedManifest:
        if not isinstance(data, Mapping):
            raise ManifestInvalid("signed manifest must be an object {manifest, signature, key_id}")
        signature, key = data.get("signature"), data.get("key_id")
        if not isinstance(signature, str) or not is_digest(key):
            raise ManifestInvalid(
                "signed manifest needs signature (base64) and key_id (sha256:<hex>)"
            )
        try:
            raw_signature = b64decode(signature, "manifest signature")
        except ValueError as exc:
            raise ManifestInvalid(str(exc)) from None
        return cls(Manifest.from_dict(data.get("manifest")), raw_signature, str(key))

    @classmethod
    def from_bytes(cls, data: bytes) -> SignedManifest:
        try:
            parsed = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestInvalid(f"signed manifest is not JSON: {exc}") from None
        return cls.from_dict(parsed)


def key_id(public_key: Ed25519PublicKey) -> str:
    """`sha256:` of the 32 raw bytes of an Ed25519 public key: how keys are named here."""
    return sha256_digest(public_key_raw(public_key))


def sign_manifest(manifest: Manifest, private_key: Ed25519PrivateKey) -> SignedManifest:
    """Sign `manifest` with the release key (done by the release authority, off the hosts)."""
    signature = private_key.sign(manifest.signed_bytes())
    return SignedManifest(manifest, signature, key_id(private_key.public_key()))


def verify_manifest(signed: SignedManifest, public_key: Ed25519PublicKey) -> Manifest:
    """The manifest if `public_key` signed it; ManifestInvalid (`wrong-key` or
    `bad-signature`) otherwise."""
    trusted = key_id(public_key)
    if signed.key_id != trusted:
        raise ManifestInvalid(
            f"manifest (stage {signed.manifest.stage}, version {signed.manifest.version}) "
            f"is signed by key {signed.key_id}, not by the trusted release key {trusted}; "
            "sign it with the release key enrolled on this host",
            reason="wrong-key",
        )
    try:
        public_key.verify(signed.signature, signed.manifest.signed_bytes())
    except InvalidSignature:
        raise ManifestInvalid(
            f"manifest (stage {signed.manifest.stage}, version {signed.manifest.version}) "
            f"names key {trusted} but its signature does not verify: the manifest was "
            "changed after signing, or the signature is corrupt",
            reason="bad-signature",
        ) from None
    return signed.manifest


def generate_signing_key() -> Ed25519PrivateKey:
    """A new release signing key (the release authority keeps it; hosts get the public half)."""
    return Ed25519PrivateKey.generate()


def public_key_raw(public_key: Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of an Ed25519 public key (what the TPM NV index holds)."""
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_from_raw(data: bytes) -> Ed25519PublicKey:
    """Ed25519 public key from its 32 raw bytes; ManifestInvalid if it is not one."""
    if len(data) != 32:
        raise ManifestInvalid(f"an Ed25519 public key is 32 bytes, not {len(data)}")
    return Ed25519PublicKey.from_public_bytes(data)


def public_key_pem(public_key: Ed25519PublicKey) -> str:
    """SubjectPublicKeyInfo PEM of a public key."""
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def load_public_key(data: bytes) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM, or from its 32 raw bytes."""
    if len(data) == 32:
        return public_key_from_raw(data)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ManifestInvalid(f"not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ManifestInvalid(f"release keys are Ed25519; this PEM holds a {type(key).__name__}")
    return key


def private_key_pem(private_key: Ed25519PrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM (for throwaway keys in tests; real keys belong in an HSM)."""
    return private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_signed_manifest(path: Path, signed: SignedManifest) -> None:
    """Write the canonical envelope to `path`."""
    path.write_bytes(signed.to_bytes())
