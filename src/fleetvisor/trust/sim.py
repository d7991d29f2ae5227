"""An in-memory TPM model for `fleetvisor sim` and for unit tests: same operations, same
quote bytes as a real TPM, and no protection whatsoever.

It follows the `Tpm` protocol: PCRs (sha256 bank, extend = sha256(old || value)),
persistent keys (ECDSA P-256 software keys), NV indexes (write-lock, counters that
only grow) and quotes whose TPMS_ATTEST / TPMT_SIGNATURE bytes are built exactly as
a TPM builds them, so `verify_evidence` checks them unchanged. It lets a simulated
fleet of thousands of hosts attest, and lets the verifier's every branch be tested
without swtpm. Never use it to protect anything: its keys live in Python memory.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from fleetvisor.trust.errors import TpmError
from fleetvisor.trust.measure import PCR_SIZE, ZERO_PCR, extend
from fleetvisor.trust.tpm import AttestationKey, Quote, Tpm
from fleetvisor.trust.tpm_structs import (
    TPM_ALG_ECDSA,
    TPM_ALG_SHA256,
    TPM_GENERATED_VALUE,
    TPM_ST_ATTEST_QUOTE,
    pcr_digest,
)


@dataclass
class _NvIndex:
    attributes: set[str]
    size: int
    data: bytes = b""
    written: bool = False
    locked: bool = False


class SimulatedTpm:
    """A TPM in memory. `power_cycle()` resets PCRs like a reboot; NV and keys stay."""

    def __init__(self, *, counter_floor: int = 0) -> None:
        self.pcrs: dict[int, bytes] = {index: ZERO_PCR for index in range(24)}
        self.nv: dict[int, _NvIndex] = {}
        self.keys: dict[int, ec.EllipticCurvePrivateKey] = {}
        self.restart_count = 0
        self.clock_ms = 0
        # A real TPM starts a new counter at the highest value any counter ever held.
        self.counter_floor = counter_floor
        self.owner_auth = ""

    def power_cycle(self) -> None:
        """A reboot: PCRs back to zero."""
        self.pcrs = {index: ZERO_PCR for index in self.pcrs}
        self.restart_count += 1

    def close(self) -> None:
        """Nothing to release (the Tpm protocol's users may call it)."""

    # -- PCRs ------------------------------------------------------------------------

    def pcr_read(self, pcrs: Iterable[int]) -> dict[int, bytes]:
        return {pcr: self.pcrs[pcr] for pcr in sorted(set(pcrs))}

    def pcr_extend(self, extends: Sequence[tuple[int, bytes]]) -> None:
        for pcr, value in extends:
            if len(value) != PCR_SIZE:
                raise ValueError(f"a sha256 extend value is {PCR_SIZE} bytes, not {len(value)}")
            self.pcrs[pcr] = extend(self.pcrs[pcr], value)

    # -- keys ------------------------------------------------------------------------

    def persistent_handles(self) -> set[int]:
        return set(self.keys)

    def create_ek(self, handle: int) -> str:
        self.keys[handle] = ec.generate_private_key(ec.SECP256R1())
        return self.read_public_pem(handle)

    def create_ak(self, ek_handle: int, handle: int) -> AttestationKey:
        if ek_handle not in self.keys:
            raise TpmError("createak", f"no EK at {ek_handle:#x}", "0x18b")
        self.keys[handle] = ec.generate_private_key(ec.SECP256R1())
        return AttestationKey(self.read_public_pem(handle), self.read_name(handle))

    def read_public_pem(self, handle: int) -> str:
        key = self._key(handle)
        return (
            key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )

    def read_name(self, handle: int) -> str:
        point = (
            self._key(handle)
            .public_key()
            .public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
        )
        return "000b" + hashlib.sha256(point).hexdigest()

    def _key(self, handle: int) -> ec.EllipticCurvePrivateKey:
        if handle not in self.keys:
            raise TpmError("readpublic", f"no object at {handle:#x} (0x18b)", "")
        return self.keys[handle]

    def set_owner_auth(self, new_auth: str) -> None:
        self.owner_auth = new_auth

    def set_lockout_parameters(
        self, *, max_tries: int, recovery_s: int, lockout_recovery_s: int
    ) -> None:
        """Accepted and ignored: the model has no dictionary-attack logic."""

    # -- NV --------------------------------------------------------------------------

    def nv_indexes(self) -> set[int]:
        return set(self.nv)

    def nv_define(self, index: int, *, size: int | None, attributes: str) -> None:
        if index in self.nv:
            raise TpmError("nvdefine", f"NV index {index:#x} is defined (0x14b)", "")
        flags = set(attributes.split("|"))
        self.nv[index] = _NvIndex(flags, 8 if "nt=counter" in flags else size or 0)

    def _index(self, index: int) -> _NvIndex:
        if index not in self.nv:
            raise TpmError("nv", f"NV index {index:#x} is not defined (0x18b)", "")
        return self.nv[index]

    def nv_write(self, index: int, data: bytes) -> None:
        entry = self._index(index)
        if entry.locked:
            raise TpmError("nvwrite", f"NV index {index:#x} is write-locked (0x148)", "")
        entry.data = data + entry.data[len(data) :]
        entry.written = True

    def nv_write_lock(self, index: int) -> None:
        self._index(index).locked = True

    def nv_read(self, index: int, size: int) -> bytes:
        entry = self._index(index)
        if not entry.written:
            raise TpmError("nvread", f"NV index {index:#x} was never written (0x14a)", "")
        return entry.data[:size]

    def nv_attributes(self, index: int) -> str:
        entry = self._index(index)
        extra = {"written"} if entry.written else set()
        extra |= {"writelocked"} if entry.locked else set()
        return "|".join(sorted(entry.attributes | extra))

    def nv_increment(self, index: int) -> None:
        entry = self._index(index)
        value = int.from_bytes(entry.data, "big") if entry.written else self.counter_floor
        entry.data = (value + 1).to_bytes(8, "big")
        entry.written = True
        self.counter_floor = max(self.counter_floor, value + 1)

    def nv_read_counter(self, index: int) -> int:
        return int.from_bytes(self.nv_read(index, 8), "big")

    # -- quotes ----------------------------------------------------------------------

    def quote(self, ak_handle: int, pcrs: Iterable[int], nonce: bytes) -> Quote:
        """TPMS_ATTEST and TPMT_SIGNATURE bytes as a TPM would produce them."""
        key = self._key(ak_handle)
        selected = sorted(set(pcrs))
        values = {pcr: self.pcrs[pcr] for pcr in selected}
        self.clock_ms += 1
        bitmap = bytearray(3)
        for pcr in selected:
            bitmap[pcr // 8] |= 1 << (pcr % 8)
        name = bytes.fromhex(self.read_name(ak_handle))
        digest = pcr_digest(values, selected)
        message = b"".join(
            [
                struct.pack(">IH", TPM_GENERATED_VALUE, TPM_ST_ATTEST_QUOTE),
                struct.pack(">H", len(name)) + name,
                struct.pack(">H", len(nonce)) + nonce,
                struct.pack(">QIIB", self.clock_ms, 0, self.restart_count, 1),
                struct.pack(">Q", 0x2019102300163636),
                struct.pack(">IHB", 1, TPM_ALG_SHA256, 3) + bytes(bitmap),
                struct.pack(">H", len(digest)) + digest,
            ]
        )
        r, s = decode_dss_signature(key.sign(message, ec.ECDSA(hashes.SHA256())))
        signature = struct.pack(">HH", TPM_ALG_ECDSA, TPM_ALG_SHA256)
        for part in (r, s):
            raw = part.to_bytes(32, "big")
            signature += struct.pack(">H", len(raw)) + raw
        return Quote(message, signature, values)


if TYPE_CHECKING:  # mypy checks that the model keeps up with the protocol
    _conforms: Tpm = SimulatedTpm()
