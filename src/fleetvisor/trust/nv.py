"""The two NV indexes of the boot chain: the release key (write-once) and the rollback counter.

    nv_release_key       40 bytes: Ed25519 release public key (32) || counter base (8, BE)
                         ownerwrite|ownerread|authread|writedefine|no_da, then write-locked:
                         nobody can rewrite it; only the owner can delete it.
    nv_rollback_counter  TPM NV counter (only ever increments)
                         authread|authwrite|ownerread|no_da: anyone may raise it, nobody
                         may lower it.

A TPM initialises a new counter to the highest value any counter on it ever held, so
its first value is not zero: enrolment records that value as the base, inside the
locked key index, and the highest release version seen is `counter - base`. Raising
the floor to version V takes `V - seen` increments: versions are sequence numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fleetvisor.trust.config import TpmLayout
from fleetvisor.trust.errors import EnrolmentError, ManifestInvalid, TpmError
from fleetvisor.trust.manifest import key_id, public_key_from_raw, public_key_raw
from fleetvisor.trust.tpm import Tpm

KEY_INDEX_SIZE = 40
KEY_INDEX_ATTRIBUTES = "ownerwrite|ownerread|authread|writedefine|no_da"
COUNTER_ATTRIBUTES = "nt=counter|authread|authwrite|ownerread|no_da"
MAX_VERSION_STEP = 4096  # ~15 ms per increment on swtpm: a minute at most


@dataclass(frozen=True)
class TrustAnchor:
    """What the key index holds: the release public key and the rollback counter's base."""

    public_key: Ed25519PublicKey
    counter_base: int

    @property
    def key_id(self) -> str:
        return key_id(self.public_key)


def is_uninitialised(error: TpmError) -> bool:
    """True when a read failed because the NV index was never written."""
    return "0x14a" in str(error).lower()


def ensure_counter(session: Tpm, layout: TpmLayout) -> int:
    """Define the rollback counter if needed and make sure it was incremented once
    (a counter cannot be read before). Its current value."""
    index = layout.nv_rollback_counter
    if index not in session.nv_indexes():
        session.nv_define(index, size=None, attributes=COUNTER_ATTRIBUTES)
    try:
        return session.nv_read_counter(index)
    except TpmError as exc:
        if not is_uninitialised(exc):
            raise
    session.nv_increment(index)
    return session.nv_read_counter(index)


def write_trust_anchor(
    session: Tpm, layout: TpmLayout, public_key: Ed25519PublicKey, counter_base: int
) -> TrustAnchor:
    """Store the release key and counter base, then write-lock the index for good.

    Idempotent for the same key; EnrolmentError if the TPM already holds another key
    (re-keying is a deliberate owner action: undefine the index first)."""
    index = layout.nv_release_key
    wanted = public_key_raw(public_key) + counter_base.to_bytes(8, "big")
    if index in session.nv_indexes():
        attributes = session.nv_attributes(index)
        if "written" in attributes.split("|"):
            existing = read_trust_anchor(session, layout)
            if public_key_raw(existing.public_key) != public_key_raw(public_key):
                raise EnrolmentError(
                    f"NV index {index:#x} already holds release key {existing.key_id}, not "
                    f"{key_id(public_key)}; to re-key this host, an operator with the owner "
                    f"authorization runs `tpm2_nvundefine {index:#x} -C o` and enrols again"
                )
            if "writelocked" not in attributes.split("|"):
                session.nv_write_lock(index)
            return existing
    else:
        session.nv_define(index, size=KEY_INDEX_SIZE, attributes=KEY_INDEX_ATTRIBUTES)
    session.nv_write(index, wanted)
    session.nv_write_lock(index)
    return TrustAnchor(public_key, counter_base)


def read_trust_anchor(session: Tpm, layout: TpmLayout) -> TrustAnchor:
    """The release key and counter base from the locked NV index."""
    data = session.nv_read(layout.nv_release_key, KEY_INDEX_SIZE)
    try:
        key = public_key_from_raw(data[:32])
    except (ManifestInvalid, ValueError) as exc:
        raise EnrolmentError(
            f"NV index {layout.nv_release_key:#x} does not hold an Ed25519 key ({exc}); "
            "enrol the host again"
        ) from None
    return TrustAnchor(key, int.from_bytes(data[32:40], "big"))


def highest_release_version(session: Tpm, layout: TpmLayout, anchor: TrustAnchor) -> int:
    """The highest release version this TPM has accepted (the anti-rollback floor)."""
    return session.nv_read_counter(layout.nv_rollback_counter) - anchor.counter_base


def raise_release_version(
    session: Tpm, layout: TpmLayout, anchor: TrustAnchor, version: int
) -> int:
    """Increment the counter until the floor is `version` (never lowers it); the new floor."""
    seen = highest_release_version(session, layout, anchor)
    if version - seen > MAX_VERSION_STEP:
        raise ValueError(
            f"release version {version} is {version - seen} above the highest seen ({seen}); "
            f"versions are sequence numbers and may advance by at most {MAX_VERSION_STEP}"
        )
    while seen < version:
        session.nv_increment(layout.nv_rollback_counter)
        seen += 1
    return seen
