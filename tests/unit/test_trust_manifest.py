"""Release manifests: canonical form, Ed25519 signature, and what a verifier refuses."""

from __future__ import annotations

import dataclasses

import pytest

from fleetvisor.trust.encoding import canonical_json, sha256_digest
from fleetvisor.trust.errors import ManifestInvalid
from fleetvisor.trust.manifest import (
    Manifest,
    SignedManifest,
    generate_signing_key,
    key_id,
    load_public_key,
    public_key_pem,
    public_key_raw,
    sign_manifest,
    verify_manifest,
)

COMPONENTS = {"agent-code": sha256_digest(b"code"), "driver:runc": sha256_digest(b"runc")}


def test_canonical_json_is_order_free_compact_and_refuses_floats() -> None:
    assert canonical_json({"b": 1, "a": [1, "x"]}) == b'{"a":[1,"x"],"b":1}'
    assert canonical_json({"a": 1, "b": 2}) == canonical_json({"b": 2, "a": 1})
    assert canonical_json({"name": "é"}) == '{"name":"é"}'.encode()
    with pytest.raises(ValueError, match="floats"):
        canonical_json({"version": 1.0})


def test_sign_and_verify_round_trip() -> None:
    key = generate_signing_key()
    signed = sign_manifest(Manifest("release", 7, "v7", COMPONENTS), key)
    assert signed.key_id == key_id(key.public_key())
    assert verify_manifest(signed, key.public_key()).version == 7
    again = SignedManifest.from_bytes(signed.to_bytes())
    assert again == signed and again.digest() == signed.digest()
    assert verify_manifest(again, key.public_key()).components == COMPONENTS


def test_signature_covers_canonical_bytes_whatever_the_key_order() -> None:
    key = generate_signing_key()
    one = sign_manifest(Manifest("release", 1, "", dict(reversed(COMPONENTS.items()))), key)
    two = sign_manifest(Manifest("release", 1, "", COMPONENTS), key)
    assert one.to_bytes() == two.to_bytes()


def test_another_key_is_reported_as_wrong_key() -> None:
    trusted, other = generate_signing_key(), generate_signing_key()
    signed = sign_manifest(Manifest("stage1", 1, "", COMPONENTS), other)
    with pytest.raises(ManifestInvalid) as caught:
        verify_manifest(signed, trusted.public_key())
    assert caught.value.reason == "wrong-key"
    assert key_id(other.public_key()) in str(caught.value)


def test_changed_content_or_forged_key_id_is_a_bad_signature() -> None:
    key = generate_signing_key()
    signed = sign_manifest(Manifest("release", 1, "", COMPONENTS), key)
    for forged in (
        dataclasses.replace(signed, manifest=Manifest("release", 2, "", COMPONENTS)),
        dataclasses.replace(
            signed,
            manifest=Manifest("release", 1, "", {**COMPONENTS, "agent-code": sha256_digest(b"x")}),
        ),
        dataclasses.replace(signed, manifest=Manifest("stage1", 1, "", COMPONENTS)),
    ):
        with pytest.raises(ManifestInvalid) as caught:
            verify_manifest(forged, key.public_key())
        assert caught.value.reason == "bad-signature"
    # Someone else's signature carrying the trusted key id: still a bad signature.
    other = sign_manifest(Manifest("release", 9, "", COMPONENTS), generate_signing_key())
    relabelled = dataclasses.replace(other, key_id=key_id(key.public_key()))
    with pytest.raises(ManifestInvalid) as caught:
        verify_manifest(relabelled, key.public_key())
    assert caught.value.reason == "bad-signature"


@pytest.mark.parametrize(
    ("stage", "version", "components", "message"),
    [
        ("stage2", 1, COMPONENTS, "stage"),
        ("release", -1, COMPONENTS, "version"),
        ("release", True, COMPONENTS, "version"),
        ("release", 1, {}, "at least one"),
        ("release", 1, {"Agent Code": sha256_digest(b"x")}, "component name"),
        ("release", 1, {"agent-code": "sha256:1234"}, "sha256"),
    ],
)
def test_malformed_manifests_are_refused(
    stage: str, version: int, components: dict[str, str], message: str
) -> None:
    with pytest.raises(ManifestInvalid, match=message):
        Manifest(stage, version, "", components)


def test_envelope_parsing_refuses_unknown_fields_and_bad_json() -> None:
    key = generate_signing_key()
    data = sign_manifest(Manifest("release", 1, "", COMPONENTS), key).to_dict()
    data["manifest"]["extra"] = 1
    with pytest.raises(ManifestInvalid, match="unknown fields"):
        SignedManifest.from_dict(data)
    with pytest.raises(ManifestInvalid, match="not JSON"):
        SignedManifest.from_bytes(b"{not json")
    with pytest.raises(ManifestInvalid, match="base64"):
        SignedManifest.from_dict(
            {"manifest": {}, "signature": "***", "key_id": COMPONENTS["agent-code"]}
        )


def test_public_keys_load_from_pem_or_raw() -> None:
    key = generate_signing_key().public_key()
    assert public_key_raw(load_public_key(public_key_pem(key).encode())) == public_key_raw(key)
    assert public_key_raw(load_public_key(public_key_raw(key))) == public_key_raw(key)
    with pytest.raises(ManifestInvalid):
        load_public_key(b"-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
