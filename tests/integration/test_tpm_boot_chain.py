"""The measured boot chain against a real software TPM (swtpm + tpm2-tools).

Each test gets its own temp dir, its own swtpm on its own free ports, and stops it by
PID at the end, even when the test fails. Skipped, with the reason printed, where
swtpm or tpm2-tools are not installed (apt-get install -y swtpm swtpm-tools tpm2-tools).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleetvisor.trust.boot import BootResult
from fleetvisor.trust.enrol import enrol_host
from fleetvisor.trust.errors import BootRefused, EnrolmentError, TpmError
from fleetvisor.trust.host import open_host_tpm
from fleetvisor.trust.lab import TAMPER_CASES, CaseOutcome, TrustLab
from fleetvisor.trust.manifest import generate_signing_key
from fleetvisor.trust.measure import ZERO_PCR
from fleetvisor.trust.swtpm import Swtpm, missing_swtpm
from fleetvisor.trust.tpm import TpmSession, missing_tools

MISSING = missing_swtpm() or missing_tools()
if MISSING:
    print(f"\nskipping TPM boot chain tests: {MISSING}")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(MISSING is not None, reason=MISSING or ""),
]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie still answers kill(0); our Popen reaps it, so check its state.
    status = Path(f"/proc/{pid}/status").read_text()
    return "\nState:\tZ" in status


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[TrustLab]:
    with TrustLab(tmp_path) as made:
        pid = made.swtpm.pid if made.swtpm else 0
        yield made
    assert made.swtpm is None and _gone(pid)


def test_swtpm_is_owned_stopped_by_pid_and_keeps_its_state(tmp_path: Path) -> None:
    key = generate_signing_key()
    first = Swtpm.start(tmp_path / "tpm")
    try:
        with TpmSession(first.tcti) as tpm:
            record = enrol_host(tpm, key.public_key())
            tpm.pcr_extend([(13, bytes(32))])
            assert tpm.pcr_read([13])[13] != ZERO_PCR
    finally:
        first.stop()
    assert first.process.returncode is not None and _gone(first.pid)
    assert not (tmp_path / "tpm" / "swtpm.pid").exists()
    second = Swtpm.start(tmp_path / "tpm")
    try:
        with TpmSession(second.tcti) as tpm:
            assert tpm.pcr_read([13])[13] == ZERO_PCR  # a power cycle resets PCRs
            assert record.layout.ak_handle in tpm.persistent_handles()  # keys survive
            assert enrol_host(tpm, key.public_key()) == record  # and so does NV
    finally:
        second.stop()


def test_enrolment_locks_the_release_key_in_nv(lab: TrustLab) -> None:
    record = lab.enrolment
    assert record is not None
    ak = serialization.load_pem_public_key(record.ak_public_pem.encode())
    assert isinstance(ak, ec.EllipticCurvePublicKey)  # the controller verifies with it alone
    layout = record.layout
    assert "writelocked" in lab.tpm.nv_attributes(layout.nv_release_key).split("|")
    with pytest.raises(TpmError, match="write-locked"):
        lab.tpm.nv_write(layout.nv_release_key, bytes(40))
    with pytest.raises(EnrolmentError, match="already holds release key"):
        enrol_host(lab.tpm, generate_signing_key().public_key())


def test_owner_authorization_guards_the_key_index_but_boots_never_need_it(
    lab: TrustLab,
) -> None:
    layout = lab.loaded_config().tpm
    enrol_host(lab.tpm, lab.release_key.public_key(), new_owner_auth="operator-secret")
    with pytest.raises(TpmError, match="authorization"):
        lab.tpm.run(["tpm2_nvundefine", hex(layout.nv_release_key), "-C", "o"])
    assert lab.attest(lab.boot()).trusted


def test_a_clean_boot_is_trusted(lab: TrustLab) -> None:
    boot = lab.boot()
    assert isinstance(boot, BootResult), boot
    pcrs = lab.loaded_config().pcrs.all()
    assert boot.log.replay(pcrs) == lab.tpm.pcr_read(pcrs)
    verdict = lab.attest(boot)
    assert verdict.trusted, verdict
    assert verdict.summary["release_version"] == 1
    assert set(verdict.summary["components"]["stage1"]) >= {"loader-config", "agent-code"}


def test_tpm2_checkquote_agrees_with_the_python_verifier(lab: TrustLab, tmp_path: Path) -> None:
    """An independent check of the quote our verifier accepts, by tpm2-tools itself."""
    boot = lab.boot()
    assert isinstance(boot, BootResult)
    nonce = secrets.token_bytes(32)
    evidence = lab.evidence(boot, nonce)
    assert lab.verify(evidence, nonce, expected_release=lab.current_release_signed()).trusted
    files = {
        "ak.pem": evidence.ak_public_pem.encode(),
        "quote.msg": evidence.quote_message,
        "quote.sig": evidence.quote_signature,
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    check = subprocess.run(
        ["tpm2_checkquote", "-u", "ak.pem", "-m", "quote.msg", "-s", "quote.sig",
         "-g", "sha256", "-q", nonce.hex()],
        cwd=tmp_path, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert check.returncode == 0, check.stderr
    wrong = subprocess.run(
        ["tpm2_checkquote", "-u", "ak.pem", "-m", "quote.msg", "-s", "quote.sig",
         "-g", "sha256", "-q", secrets.token_hex(32)],
        cwd=tmp_path, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert wrong.returncode != 0


@pytest.mark.parametrize("case", TAMPER_CASES, ids=lambda run: run.__name__.removeprefix("case_"))
def test_tamper_case_leaves_the_host_untrusted_for_the_right_reason(
    lab: TrustLab, case: Callable[[TrustLab], CaseOutcome]
) -> None:
    outcome = case(lab)
    assert not outcome.verdict.trusted
    assert outcome.refused_with == outcome.case.refusal, outcome.to_dict()
    assert outcome.verdict.reason == outcome.case.verdict_reason, outcome.to_dict()
    assert outcome.detected, outcome.to_dict()
    # Undo is complete: the very next clean boot is trusted again.
    assert lab.attest(lab.boot()).trusted


def test_the_tpm_counter_refuses_a_rollback_the_controller_itself_assigned(
    lab: TrustLab,
) -> None:
    old = lab.current_release
    assert old is not None
    lab.current_release = lab.publish_release(2)
    assert isinstance(lab.boot(), BootResult)
    lab.current_release = old  # e.g. a restored controller database assigns release 1
    boot = lab.boot()
    assert isinstance(boot, BootRefused)
    assert (boot.reason, boot.expected, boot.measured) == ("rollback", "version >= 2", "version 1")
    verdict = lab.attest(boot)  # the controller expects release 1: only the TPM knew better
    assert verdict.reason == "boot-refused"
    assert verdict.findings[0].measured == "version 1"


def test_crashed_agents_do_not_lock_the_attestation_key_out(lab: TrustLab) -> None:
    """A swtpm killed without TPM2_Shutdown counts as a dictionary-attack failure once
    a key was used; enrolment makes that forgiving enough for an agent that crashes."""
    for _ in range(5):
        boot = lab.boot()
        assert lab.attest(boot).trusted
        assert lab.swtpm is not None
        os.kill(lab.swtpm.pid, signal.SIGKILL)
        lab.swtpm.process.wait(5)
    assert lab.attest(lab.boot()).trusted


def test_open_host_tpm_starts_and_stops_its_own_swtpm(tmp_path: Path) -> None:
    host = open_host_tpm(tmp_path / "agent-state", device=None)
    try:
        assert host.kind == "swtpm" and host.swtpm is not None
        pid = host.swtpm.pid
        assert host.session.pcr_read([12])[12] == ZERO_PCR
    finally:
        host.close()
    assert _gone(pid)
