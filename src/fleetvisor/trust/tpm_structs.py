"""Pure-Python parsing of the two TPM 2.0 structures a quote consists of, and its check.

So the controller verifies a quote with `cryptography` alone, without a TPM or
tpm2-tools: `TPMS_ATTEST` (the signed message: magic, type, signer, extraData = the
nonce, clock, PCR selection and digest) and `TPMT_SIGNATURE` (ECDSA or RSASSA over
it). Layouts follow TPM 2.0 Library Part 2 (Structures); all integers big-endian.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

TPM_GENERATED_VALUE = 0xFF544347
TPM_ST_ATTEST_QUOTE = 0x8018
TPM_ALG_SHA256 = 0x000B
TPM_ALG_RSASSA = 0x0014
TPM_ALG_ECDSA = 0x0018


class StructureError(ValueError):
    """Bytes that do not parse as the TPM structure expected."""


class _Reader:
    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.offset, self.what = data, 0, what

    def take(self, size: int) -> bytes:
        if self.offset + size > len(self.data):
            raise StructureError(f"{self.what} is truncated at byte {self.offset}")
        chunk = self.data[self.offset : self.offset + size]
        self.offset += size
        return chunk

    def u8(self) -> int:
        return int(self.take(1)[0])

    def u16(self) -> int:
        return int(struct.unpack(">H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack(">Q", self.take(8))[0])

    def sized(self) -> bytes:
        """A TPM2B: 16-bit size, then that many bytes."""
        return self.take(self.u16())


@dataclass(frozen=True)
class QuoteInfo:
    """What the TPM signed in a quote."""

    qualified_signer: bytes
    extra_data: bytes  # the verifier's nonce
    clock: int
    reset_count: int
    restart_count: int
    safe: bool
    firmware_version: int
    pcr_selection: dict[int, list[int]]  # hash algorithm -> PCR indexes, ascending
    pcr_digest: bytes


def parse_attest(message: bytes) -> QuoteInfo:
    """Parse a TPMS_ATTEST of type quote; StructureError if it is anything else."""
    reader = _Reader(message, "quote message (TPMS_ATTEST)")
    magic = reader.u32()
    if magic != TPM_GENERATED_VALUE:
        raise StructureError(
            f"quote message magic is {magic:#x}, not TPM_GENERATED ({TPM_GENERATED_VALUE:#x}): "
            "it was not produced by a TPM"
        )
    kind = reader.u16()
    if kind != TPM_ST_ATTEST_QUOTE:
        raise StructureError(
            f"attestation type {kind:#x} is not a quote ({TPM_ST_ATTEST_QUOTE:#x})"
        )
    signer = reader.sized()
    extra = reader.sized()
    clock, reset, restart, safe = reader.u64(), reader.u32(), reader.u32(), reader.u8()
    firmware = reader.u64()
    selection: dict[int, list[int]] = {}
    for _ in range(reader.u32()):
        algorithm = reader.u16()
        bitmap = reader.take(reader.u8())
        selection[algorithm] = [
            index * 8 + bit
            for index, bits in enumerate(bitmap)
            for bit in range(8)
            if bits >> bit & 1
        ]
    digest = reader.sized()
    if reader.offset != len(message):
        raise StructureError(f"quote message has {len(message) - reader.offset} trailing bytes")
    return QuoteInfo(signer, extra, clock, reset, restart, bool(safe), firmware, selection, digest)


@dataclass(frozen=True)
class TpmSignature:
    """A TPMT_SIGNATURE: algorithm, hash, and the signature in the form `cryptography` wants
    (DER for ECDSA, raw for RSASSA)."""

    algorithm: int
    hash_algorithm: int
    signature: bytes


def parse_signature(data: bytes) -> TpmSignature:
    """Parse a TPMT_SIGNATURE holding ECDSA or RSASSA over sha256."""
    reader = _Reader(data, "quote signature (TPMT_SIGNATURE)")
    algorithm, hash_algorithm = reader.u16(), reader.u16()
    if hash_algorithm != TPM_ALG_SHA256:
        raise StructureError(f"quote signature hash {hash_algorithm:#x} is not sha256")
    if algorithm == TPM_ALG_ECDSA:
        r, s = reader.sized(), reader.sized()
        der = encode_dss_signature(int.from_bytes(r, "big"), int.from_bytes(s, "big"))
        signature = TpmSignature(algorithm, hash_algorithm, der)
    elif algorithm == TPM_ALG_RSASSA:
        signature = TpmSignature(algorithm, hash_algorithm, reader.sized())
    else:
        raise StructureError(
            f"quote signature algorithm {algorithm:#x} is neither ECDSA nor RSASSA"
        )
    if reader.offset != len(data):
        raise StructureError("quote signature has trailing bytes")
    return signature


def verify_quote_signature(message: bytes, signature: bytes, ak_public_pem: str) -> None:
    """Raise InvalidSignature unless the AK (PEM) signed `message`; StructureError if
    the signature cannot be parsed or its kind does not match the key's."""
    parsed = parse_signature(signature)
    key = serialization.load_pem_public_key(ak_public_pem.encode())
    if isinstance(key, ec.EllipticCurvePublicKey) and parsed.algorithm == TPM_ALG_ECDSA:
        key.verify(parsed.signature, message, ec.ECDSA(hashes.SHA256()))
    elif isinstance(key, rsa.RSAPublicKey) and parsed.algorithm == TPM_ALG_RSASSA:
        key.verify(parsed.signature, message, padding.PKCS1v15(), hashes.SHA256())
    else:
        raise InvalidSignature(
            f"the quote is signed with algorithm {parsed.algorithm:#x}, which does not match "
            f"the enrolled attestation key ({type(key).__name__})"
        )


def pcr_digest(values: Mapping[int, bytes], selection: list[int]) -> bytes:
    """What a quote's pcrDigest must be: sha256 of the selected PCR values in index order."""
    return hashlib.sha256(b"".join(values[pcr] for pcr in sorted(selection))).digest()
