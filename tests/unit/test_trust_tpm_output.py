"""Reading tpm2-tools' output: PCR listings and the error line that tells the operator why."""

from __future__ import annotations

from fleetvisor.trust.tpm import _hint, _parse_pcr_yaml, _summary

QUOTE_OUTPUT = """quoted: ff54434780180022000b
signature:
  alg: ecdsa
  sig: 3044
pcrs:
  sha1:
    12: 0x0000000000000000000000000000000000000000
  sha256:
    12: 0x153D5381929B50792D3B22AE9596544AF3B0E4805BE1555A595E6D2A2734933F
    14: 0x0000000000000000000000000000000000000000000000000000000000000000
calcDigest: 606c2210
"""

NV_LOCKED = """WARN: Reading full size of the NV index
WARNING:esys:src/tss2-esys/api/Esys_NV_Write.c:310:Esys_NV_Write_Finish() Received TPM Error
ERROR:esys:src/tss2-esys/api/Esys_NV_Write.c:110:Esys_NV_Write() Esys Finish ErrorCode (0x00000148)
ERROR: Failed to write NV area at index 0x1500010
ERROR: Tss2_Sys_NV_Write(0x148) - tpm:error(2.0): NV access locked
ERROR: Unable to run tpm2_nvwrite"""


def test_only_the_sha256_bank_is_read() -> None:
    values = _parse_pcr_yaml(QUOTE_OUTPUT.split("pcrs:", 1)[1])
    assert sorted(values) == [12, 14]
    assert values[12].hex().startswith("153d53") and len(values[12]) == 32
    assert values[14] == bytes(32)


def test_errors_show_the_tpms_own_words_and_a_hint() -> None:
    assert _summary(NV_LOCKED, 1) == "Tss2_Sys_NV_Write(0x148) - tpm:error(2.0): NV access locked"
    assert "write-locked" in _hint(NV_LOCKED)
    assert "not reachable" in _hint("ERROR: Failed to connect: Connection refused")
    assert _summary("", 3) == "exit code 3"
