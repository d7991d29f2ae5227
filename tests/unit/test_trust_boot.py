"""The first-stage loader's decisions, over the in-memory TPM model (no swtpm needed).

The same chain runs against a real swtpm in tests/integration/test_tpm_boot_chain.py;
here every refusal rule is pinned down quickly: which component, expected vs measured,
and that even a refused boot leaves the TPM and the event log in agreement.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleetvisor.trust.boot import BootResult, ReleaseBundle, Stage1Result, measured_boot
from fleetvisor.trust.config import LoaderConfig, TpmLayout
from fleetvisor.trust.encoding import sha256_digest
from fleetvisor.trust.enrol import EnrolmentRecord, enrol_host
from fleetvisor.trust.errors import BootRefused, ConfigInvalid, EnrolmentError
from fleetvisor.trust.manifest import (
    Manifest,
    SignedManifest,
    generate_signing_key,
    public_key_pem,
    sign_manifest,
    write_signed_manifest,
)
from fleetvisor.trust.measure import REFUSAL_COMPONENT, digest_path
from fleetvisor.trust.nv import MAX_VERSION_STEP, highest_release_version, read_trust_anchor
from fleetvisor.trust.sim import SimulatedTpm


@dataclass
class Host:
    root: Path
    tpm: SimulatedTpm
    key: Ed25519PrivateKey
    config: LoaderConfig
    enrolment: EnrolmentRecord

    def sign_stage1(self, key: Ed25519PrivateKey | None = None) -> SignedManifest:
        config = LoaderConfig.load(self.root / "loader.json")
        components = {"loader-config": sha256_digest(config.source)}
        components.update({name: digest_path(path) for name, path in config.measured_paths()})
        signed = sign_manifest(Manifest("stage1", 1, "s1", components), key or self.key)
        write_signed_manifest(config.stage1_manifest, signed)
        return signed

    def release(self, version: int, key: Ed25519PrivateKey | None = None) -> ReleaseBundle:
        tree = self.root / f"release-{version}"
        tree.mkdir(exist_ok=True)
        (tree / "coordinator.py").write_text(f"VERSION = {version}\n")
        manifest = Manifest("release", version, f"v{version}", {"coordinator": digest_path(tree)})
        return ReleaseBundle(sign_manifest(manifest, key or self.key), {"coordinator": tree})

    def boot(self, release: ReleaseBundle | None = None) -> BootResult:
        self.tpm.power_cycle()
        config = LoaderConfig.load(self.root / "loader.json")
        return measured_boot(self.tpm, config, (lambda _: release) if release else None)

    def refused(self, release: ReleaseBundle | None = None) -> BootRefused:
        with pytest.raises(BootRefused) as caught:
            self.boot(release)
        refusal = caught.value
        # Even a refusal leaves log and TPM in agreement, the refusal itself measured last.
        pcrs = self.config.pcrs.all()
        assert refusal.event_log.replay(pcrs) == self.tpm.pcr_read(pcrs)
        assert refusal.event_log.events[-1].component == REFUSAL_COMPONENT
        return refusal


@pytest.fixture
def host(tmp_path: Path) -> Host:
    code = tmp_path / "agent-code"
    (code / "agent").mkdir(parents=True)
    (code / "agent" / "runtime.py").write_text("def run():\n    return 'agent'\n")
    (code / "__init__.py").write_text("")
    runc = tmp_path / "runc"
    runc.write_bytes(b"\x7fELF runc" + bytes(1000))
    key = generate_signing_key()
    (tmp_path / "release.pub").write_text(public_key_pem(key.public_key()))
    config = LoaderConfig(
        stage1_manifest=tmp_path / "stage1.json",
        agent_code=code,
        drivers={"runc": runc},
        release_public_key_file=tmp_path / "release.pub",
    ).write(tmp_path / "loader.json")
    tpm = SimulatedTpm(counter_floor=41)
    enrolment = enrol_host(tpm, key.public_key(), tpm_kind="sim")
    made = Host(tmp_path, tpm, key, config, enrolment)
    made.sign_stage1()
    return made


def test_clean_boot_measures_every_component_into_its_pcr(host: Host) -> None:
    result = host.boot(host.release(3))
    events = [(e.pcr, e.phase, e.component) for e in result.log.events]
    assert events == [
        (12, "root", "release-public-key"),
        (12, "stage1", "manifest"),
        (12, "stage1", "loader-config"),
        (13, "stage1", "agent-code"),
        (13, "stage1", "driver:runc"),
        (14, "release", "manifest"),
        (14, "release", "coordinator"),
    ]
    assert result.log.replay([12, 13, 14]) == host.tpm.pcr_read([12, 13, 14])
    assert result.highest_release_version == 3
    assert result.release is not None and result.release.manifest.version == 3
    assert set(result.timings) == {"phase1_s", "stage1_s", "release_s"}


def test_a_saved_boot_result_round_trips_and_knows_if_it_still_holds(host: Host) -> None:
    result = host.boot(host.release(2))
    saved = BootResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert saved == result
    assert saved.matches(host.tpm, host.config.pcrs.all())
    host.tpm.pcr_extend([(13, bytes(32))])  # something else was measured since
    assert not saved.matches(host.tpm, host.config.pcrs.all())


def test_boot_without_release_stops_at_the_first_coordinator(host: Host) -> None:
    result = host.boot()
    assert result.release is None and result.highest_release_version is None
    assert {e.phase for e in result.log.events} == {"root", "stage1"}


def test_enrolment_records_the_counter_base_and_is_idempotent(host: Host) -> None:
    layout = TpmLayout()
    anchor = read_trust_anchor(host.tpm, layout)
    assert host.enrolment.counter_base == anchor.counter_base == 42  # TPM started it at 41+1
    assert highest_release_version(host.tpm, layout, anchor) == 0
    assert enrol_host(host.tpm, host.key.public_key(), tpm_kind="sim") == host.enrolment
    with pytest.raises(EnrolmentError, match="already holds release key"):
        enrol_host(host.tpm, generate_signing_key().public_key(), tpm_kind="sim")


@pytest.mark.parametrize("target", ["agent", "runc", "config"])
def test_one_changed_byte_is_refused_with_both_digests(host: Host, target: str) -> None:
    expected = host.sign_stage1().manifest.components
    path, component = {
        "agent": (host.config.agent_code / "agent" / "runtime.py", "agent-code"),
        "runc": (host.config.drivers["runc"], "driver:runc"),
        "config": (host.root / "loader.json", "loader-config"),
    }[target]
    data = bytearray(path.read_bytes())
    at = data.index(b"  ") if target == "config" else len(data) // 2
    data[at : at + 1] = b"\t" if target == "config" else bytes([data[at] ^ 1])
    path.write_bytes(bytes(data))
    refusal = host.refused(host.release(1))
    assert (refusal.component, refusal.reason, refusal.phase) == (
        component,
        "digest-mismatch",
        "stage1",
    )
    assert refusal.expected == expected[component]
    assert refusal.measured != refusal.expected and refusal.measured.startswith("sha256:")
    assert component in str(refusal) and refusal.expected in str(refusal)


def test_phase_three_never_runs_when_stage_one_is_refused(host: Host) -> None:
    (host.config.agent_code / "agent" / "runtime.py").write_text("evil = True\n")
    asked: list[Stage1Result] = []

    def obtain(stage1: Stage1Result) -> None:
        asked.append(stage1)

    host.tpm.power_cycle()
    with pytest.raises(BootRefused):
        measured_boot(host.tpm, host.config, obtain)
    assert asked == []


def test_missing_driver_is_refused(host: Host) -> None:
    host.config.drivers["runc"].unlink()
    refusal = host.refused()
    assert (refusal.component, refusal.reason) == ("driver:runc", "missing")


def test_stage1_manifest_signed_by_another_key(host: Host) -> None:
    host.sign_stage1(generate_signing_key())
    refusal = host.refused()
    assert (refusal.component, refusal.reason) == ("manifest", "wrong-key")
    assert refusal.expected == f"signed by {host.enrolment.release_key_id}"
    assert len(refusal.manifests) == 1  # the host can still show what it was given


def test_unreadable_stage1_manifest(host: Host) -> None:
    host.config.stage1_manifest.write_text("{")
    refusal = host.refused()
    assert (refusal.component, refusal.reason) == ("manifest", "malformed")


def test_release_signed_by_another_key(host: Host) -> None:
    refusal = host.refused(host.release(2, generate_signing_key()))
    assert (refusal.component, refusal.reason, refusal.phase) == (
        "manifest",
        "wrong-key",
        "release",
    )


def test_stage1_manifest_cannot_pass_for_a_release(host: Host) -> None:
    stage1 = host.sign_stage1()
    bundle = ReleaseBundle(stage1, {"agent-code": host.config.agent_code})
    refusal = host.refused(bundle)
    assert (refusal.component, refusal.reason) == ("manifest", "wrong-stage")


def test_release_component_changed_missing_or_unlisted(host: Host) -> None:
    bundle = host.release(2)
    (bundle.files["coordinator"] / "coordinator.py").write_text("VERSION = 666\n")
    assert host.refused(bundle).reason == "digest-mismatch"
    bundle = host.release(2)
    extra = ReleaseBundle(bundle.signed, {**bundle.files, "extra": host.config.agent_code})
    assert (host.refused(extra).component, host.refused(extra).reason) == ("extra", "unlisted")
    missing = ReleaseBundle(bundle.signed, {})
    assert (host.refused(missing).component, host.refused(missing).reason) == (
        "coordinator",
        "missing",
    )


def test_rollback_is_refused_against_the_tpm_counter(host: Host) -> None:
    assert host.boot(host.release(3)).highest_release_version == 3
    assert host.boot(host.release(3)).highest_release_version == 3  # same version: fine
    refusal = host.refused(host.release(2))
    assert (refusal.component, refusal.reason) == ("manifest", "rollback")
    assert (refusal.expected, refusal.measured) == ("version >= 3", "version 2")
    assert host.boot(host.release(4)).highest_release_version == 4


def test_a_huge_version_jump_is_refused(host: Host) -> None:
    refusal = host.refused(host.release(MAX_VERSION_STEP + 1))
    assert refusal.reason == "version-jump"


def test_swapped_key_file_on_disk(host: Host) -> None:
    (host.root / "release.pub").write_text(public_key_pem(generate_signing_key().public_key()))
    refusal = host.refused()
    assert (refusal.component, refusal.reason, refusal.phase) == (
        "release-public-key",
        "key-file-mismatch",
        "root",
    )
    assert refusal.expected == host.enrolment.release_key_id


def test_a_tpm_that_was_never_enrolled(host: Host) -> None:
    host.tpm = SimulatedTpm()
    refusal = host.refused()
    assert (refusal.component, refusal.reason) == ("release-public-key", "not-enrolled")


def test_loader_config_errors_say_what_to_fix(tmp_path: Path) -> None:
    path = tmp_path / "loader.json"
    path.write_text('{"format": "fleetvisor-loader/1", "agent_code": "/x"}')
    with pytest.raises(ConfigInvalid, match="stage1_manifest"):
        LoaderConfig.load(path)
    path.write_text('{"format": "other"}')
    with pytest.raises(ConfigInvalid, match="format"):
        LoaderConfig.load(path)
    with pytest.raises(ConfigInvalid, match="cannot read"):
        LoaderConfig.load(tmp_path / "absent.json")
