"""The controller's attestation service over in-process agents whose measured boot runs on the
in-memory TPM model (trust/sim.py): enrolment, releases, challenges, verdicts recorded on
the host, events, and placement of instances that require a trusted host.

The same flow runs over a real swtpm and real agent processes in
tests/integration/test_attestation_fleet.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient
from sqlalchemy import select

from fleetvisor.agent.boot import MeasuredBoot, run_chain
from fleetvisor.agent.core import Agent
from fleetvisor.api.app import create_app
from fleetvisor.controller.instances import InstanceRequest
from fleetvisor.controller.settings import ControllerSettings
from fleetvisor.errors import Conflict, InsufficientCapacity, InvalidInput, NotFound
from fleetvisor.fleet.inprocess import InProcessFleet
from fleetvisor.model.resources import Resources
from fleetvisor.store.tables import EventRow, ReleaseRow
from fleetvisor.trust.config import LoaderConfig
from fleetvisor.trust.encoding import sha256_digest
from fleetvisor.trust.enrol import EnrolmentRecord, enrol_host
from fleetvisor.trust.manifest import (
    Manifest,
    SignedManifest,
    generate_signing_key,
    public_key_pem,
    sign_manifest,
    write_signed_manifest,
)
from fleetvisor.trust.measure import digest_path
from fleetvisor.trust.sim import SimulatedTpm

SETTINGS = ControllerSettings(heartbeat_interval=1.0, down_after_missed=3, operation_timeout=20.0)
SMALL = Resources(vcpus=500, memory=256, disk=1, net=10)


class MeasuredHost:
    """One host's files, its simulated TPM, and the release key that signs its manifests."""

    def __init__(self, root: Path, key: Ed25519PrivateKey) -> None:
        self.root = root
        self.key = key
        code = root / "agent-code"
        (code / "agent").mkdir(parents=True)
        (code / "agent" / "runtime.py").write_text("def run():\n    return 'agent'\n")
        runc = root / "runc"
        runc.write_bytes(b"\x7fELF runc" + bytes(512))
        self.config = LoaderConfig(
            stage1_manifest=root / "stage1.json", agent_code=code, drivers={"runc": runc}
        ).write(root / "loader.json")
        self.releases = root / "releases"
        self.tpm = SimulatedTpm(counter_floor=7)
        self.record: EnrolmentRecord = enrol_host(self.tpm, key.public_key(), tpm_kind="sim")
        self.sign_stage1()

    def sign_stage1(self, key: Ed25519PrivateKey | None = None) -> None:
        config = LoaderConfig.load(self.root / "loader.json")
        components = {"loader-config": sha256_digest(config.source)}
        components.update({name: digest_path(path) for name, path in config.measured_paths()})
        signed = sign_manifest(Manifest("stage1", 1, "s1", components), key or self.key)
        write_signed_manifest(config.stage1_manifest, signed)

    def release(self, version: int, key: Ed25519PrivateKey | None = None) -> SignedManifest:
        """Install release `version` under releases/v<version>/ and sign its manifest."""
        tree = self.releases / f"v{version}" / "coordinator"
        tree.mkdir(parents=True, exist_ok=True)
        (tree / "coordinator.py").write_text(f"VERSION = {version}\n")
        manifest = Manifest("release", version, f"v{version}", {"coordinator": digest_path(tree)})
        return sign_manifest(manifest, key or self.key)

    def boot(self, release: SignedManifest | None) -> MeasuredBoot:
        """A reboot (PCRs reset), then the agent's boot step with `release`."""
        self.tpm.power_cycle()
        config = LoaderConfig.load(self.root / "loader.json")
        return run_chain(self.tpm, config, release, self.releases)


class AttestingAgent:
    """An in-process agent that answers challenges from its measured boot."""

    def __init__(self, agent: Agent, boot: MeasuredBoot | None) -> None:
        self._agent = agent
        self.boot = boot

    def __getattr__(self, name: str) -> Any:
        return getattr(self._agent, name)

    async def attest(self, nonce: bytes) -> dict[str, Any]:
        if self.boot is None:
            from fleetvisor.errors import DriverError

            raise DriverError("this agent was started without --measured-boot")
        return await self.boot.attest(nonce)


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return generate_signing_key()


@pytest.fixture
def measured(tmp_path: Path, key: Ed25519PrivateKey) -> MeasuredHost:
    return MeasuredHost(tmp_path / "host-1", key)


@pytest.fixture
async def fleet(tmp_path: Path, measured: MeasuredHost, key: Ed25519PrivateKey) -> InProcessFleet:
    fleet = InProcessFleet(tmp_path / "controller", settings=SETTINGS)
    for name in ("host-1", "host-2"):
        await fleet.add_host(name, capacity=Resources(2000, 2048, 100, 1000))
    service = fleet.controller.attestation
    service.enrol("host-1", measured.record.to_dict(), public_key_pem(key.public_key()))
    service.publish(measured.release(1).to_dict())
    return fleet


async def boot_and_challenge(
    fleet: InProcessFleet, measured: MeasuredHost, release: SignedManifest | None = None
) -> tuple[MeasuredBoot, Any]:
    """The host's boot step asks for its release (unless one is forced on it), boots,
    and the controller challenges it."""
    service = fleet.controller.attestation
    assigned = service.assigned_release("host-1")
    if release is None and assigned is not None:
        release = SignedManifest.from_dict(assigned.signed)
    boot = measured.boot(release)
    fleet.agents["host-1"] = AttestingAgent(fleet.agents["host-1"], boot)  # type: ignore[assignment]
    return boot, await service.challenge("host-1")


def event_kinds(fleet: InProcessFleet, prefix: str) -> list[EventRow]:
    with fleet.controller.db.read() as session:
        query = select(EventRow).where(EventRow.kind.startswith(prefix)).order_by(EventRow.id)
        return list(session.scalars(query))


async def test_a_clean_boot_is_trusted_and_recorded(
    fleet: InProcessFleet, measured: MeasuredHost
) -> None:
    boot, verdict = await boot_and_challenge(fleet, measured)
    assert boot.refused is None and verdict.trusted, verdict
    host = fleet.controller.hosts.get("host-1")
    assert host.attestation_state == "trusted"
    assert host.attestation["summary"]["release_version"] == 1
    assert host.min_release_version == 1 and host.attested_at is not None
    trusted = event_kinds(fleet, "host.trusted")
    assert [e.subject for e in trusted] == ["host/host-1"]
    await fleet.controller.attestation.challenge("host-1")  # nothing changed: no new event
    assert len(event_kinds(fleet, "host.trusted")) == 1


async def test_a_host_that_is_not_enrolled_stays_unknown(fleet: InProcessFleet) -> None:
    verdict = await fleet.controller.attestation.challenge("host-2")
    assert (verdict.state, verdict.reason) == ("unknown", "not-enrolled")
    assert fleet.controller.hosts.get("host-2").attestation_state == "unknown"
    assert fleet.controller.attestation.due() == ["host-1"]  # only enrolled hosts are challenged


@pytest.mark.parametrize("target", ["agent-code", "driver:runc", "loader-config", "coordinator"])
async def test_one_changed_byte_leaves_the_host_untrusted(
    fleet: InProcessFleet, measured: MeasuredHost, target: str
) -> None:
    paths = {
        "agent-code": measured.root / "agent-code" / "agent" / "runtime.py",
        "driver:runc": measured.root / "runc",
        "loader-config": measured.root / "loader.json",
        "coordinator": measured.releases / "v1" / "coordinator" / "coordinator.py",
    }
    path = paths[target]
    data = bytearray(path.read_bytes())
    at = data.index(b" ") if target == "loader-config" else len(data) // 2
    data[at] = ord("\t") if target == "loader-config" else data[at] ^ 1
    path.write_bytes(bytes(data))
    boot, verdict = await boot_and_challenge(fleet, measured)
    assert boot.refused is not None and boot.refused.component == target
    assert (verdict.state, verdict.reason) == ("untrusted", "component-mismatch")
    finding = verdict.findings[0]
    assert finding.component == target and finding.expected != finding.measured
    host = fleet.controller.hosts.get("host-1")
    assert host.attestation_state == "untrusted"
    assert host.attestation["findings"][0]["component"] == target
    event = event_kinds(fleet, "host.untrusted")[-1]
    assert event.data["component"] == target and event.data["reason"] == "component-mismatch"


async def test_a_replayed_quote_is_refused(fleet: InProcessFleet, measured: MeasuredHost) -> None:
    service = fleet.controller.attestation
    boot, verdict = await boot_and_challenge(fleet, measured)
    assert verdict.trusted
    old_nonce = service.issue_nonce("host-1")
    old_answer = boot.evidence(old_nonce)
    assert service.submit("host-1", old_nonce, old_answer).trusted
    fresh = service.issue_nonce("host-1")
    replayed = service.submit("host-1", fresh, old_answer)
    assert (replayed.state, replayed.reason) == ("untrusted", "stale-nonce")
    again = service.submit("host-1", old_nonce, old_answer)  # a used nonce is not accepted twice
    assert again.reason == "stale-nonce"
    assert fleet.controller.hosts.get("host-1").attestation_state == "untrusted"
    assert (await service.challenge("host-1")).trusted  # a fresh answer restores it


async def test_manifests_signed_by_another_key(
    fleet: InProcessFleet, measured: MeasuredHost
) -> None:
    foreign = generate_signing_key()
    with pytest.raises(InvalidInput, match="not by the trusted release key"):
        fleet.controller.attestation.publish(measured.release(2, key=foreign).to_dict())
    with pytest.raises(Conflict, match="trusts release key"):
        fleet.controller.attestation.publish(
            measured.release(2, key=foreign).to_dict(), public_key_pem(foreign.public_key())
        )
    measured.sign_stage1(key=foreign)
    boot, verdict = await boot_and_challenge(fleet, measured)
    assert boot.refused is not None and boot.refused.reason == "wrong-key"
    assert (verdict.state, verdict.reason) == ("untrusted", "manifest-signature")


async def test_a_rollback_to_an_older_release_is_refused(
    fleet: InProcessFleet, measured: MeasuredHost
) -> None:
    service = fleet.controller.attestation
    v1 = measured.release(1)
    service.publish(measured.release(2).to_dict())
    _, verdict = await boot_and_challenge(fleet, measured)
    assert verdict.trusted and fleet.controller.hosts.get("host-1").min_release_version == 2
    row, created = service.publish(v1.to_dict())
    assert (row.version, created) == (1, False)  # the same manifest again changes nothing
    boot, verdict = await boot_and_challenge(fleet, measured, release=v1)  # fed an old release
    assert boot.refused is not None and boot.refused.reason == "rollback"  # the TPM counter
    assert (verdict.state, verdict.reason) == ("untrusted", "rollback")  # and the controller


async def test_publishing_a_newer_release_keeps_running_hosts_trusted(
    fleet: InProcessFleet, measured: MeasuredHost
) -> None:
    service = fleet.controller.attestation
    _, verdict = await boot_and_challenge(fleet, measured)
    assert verdict.trusted
    service.publish(measured.release(2).to_dict())
    assert (await service.challenge("host-1")).trusted  # held to the release it booted
    _, verdict = await boot_and_challenge(fleet, measured)  # next boot: the new release
    assert verdict.trusted and verdict.summary["release_version"] == 2
    service.publish(measured.release(4).to_dict())
    with pytest.raises(Conflict, match="older than the published version 4"):
        service.publish(measured.release(3).to_dict())
    with pytest.raises(Conflict, match="already published with other contents"):
        other = Manifest("release", 2, "v2-other", {"coordinator": sha256_digest(b"other")})
        service.publish(sign_manifest(other, measured.key).to_dict())


async def test_an_agent_without_measured_boot_is_untrusted_once_enrolled(
    fleet: InProcessFleet,
) -> None:
    fleet.agents["host-1"] = AttestingAgent(fleet.agents["host-1"], None)  # type: ignore[assignment]
    verdict = await fleet.controller.attestation.challenge("host-1")
    assert (verdict.state, verdict.reason) == ("untrusted", "no-evidence")
    assert "--measured-boot" in verdict.message


async def test_registering_again_resets_the_standing(
    fleet: InProcessFleet, measured: MeasuredHost
) -> None:
    _, verdict = await boot_and_challenge(fleet, measured)
    assert verdict.trusted
    await fleet.register("host-1")
    host = fleet.controller.hosts.get("host-1")
    assert (host.attestation_state, host.attested_at) == ("unknown", None)
    assert fleet.controller.attestation.due() == ["host-1"]


async def test_trusted_instances_land_only_on_trusted_hosts(
    fleet: InProcessFleet, measured: MeasuredHost
) -> None:
    instances = fleet.controller.instances
    secure = InstanceRequest(name="vault-1", image="busybox", resources=SMALL, trusted_host=True)
    with pytest.raises(InsufficientCapacity, match="trusted"):
        instances.create(secure)  # nobody attested yet
    _, verdict = await boot_and_challenge(fleet, measured)
    assert verdict.trusted
    for i in range(3):
        row, _ = instances.create(
            InstanceRequest(name=f"vault-{i}", image="busybox", resources=SMALL, trusted_host=True)
        )
        assert row.host_id == fleet.controller.hosts.get("host-1").id and row.trusted_host
    await fleet.settle()
    # An untrusted host takes nothing, not even instances that do not require trust.
    measured.sign_stage1(key=generate_signing_key())
    _, verdict = await boot_and_challenge(fleet, measured)
    assert not verdict.trusted
    plain, _ = instances.create(InstanceRequest(name="web-1", image="busybox", resources=SMALL))
    assert plain.host_id == fleet.controller.hosts.get("host-2").id
    with pytest.raises(InsufficientCapacity, match="untrusted"):
        instances.create(
            InstanceRequest(name="vault-9", image="busybox", resources=SMALL, trusted_host=True)
        )


def test_the_api_enrols_publishes_and_hands_each_host_its_release(
    tmp_path: Path, measured: MeasuredHost, key: Ed25519PrivateKey
) -> None:
    fleet = InProcessFleet(tmp_path / "api", settings=SETTINGS)
    controller = fleet.controller
    registration = controller.hosts.register(
        name="host-1",
        cluster="default",
        agent_url="http://127.0.0.1:9",
        agent_token="t" * 32,
        info=_host_info(),
        labels={},
        instances=[],
    )
    admin = {"Authorization": f"Bearer {controller.admin_token}"}
    own = {"Authorization": f"Bearer {registration.token}"}
    with TestClient(create_app(controller, run_loops=False)) as client:
        body = {"signed": measured.release(1).to_dict()}
        answer = client.post("/v1/trust/releases", json=body, headers=admin)
        assert answer.status_code == 409 and "no release public key" in answer.json()["detail"]
        body["release_public_key"] = public_key_pem(key.public_key())
        assert client.post("/v1/trust/releases", json=body, headers=admin).status_code == 201
        assert client.post("/v1/trust/releases", json=body, headers=admin).status_code == 200
        bad = client.post(
            "/v1/trust/enrolments", json={"host": "host-1", "record": {}}, headers=admin
        )
        assert bad.status_code == 422 and "format" in bad.json()["detail"]
        enrol = {"host": "host-1", "record": measured.record.to_dict()}
        assert client.post("/v1/trust/enrolments", json=enrol, headers=admin).status_code == 201
        release = client.get("/v1/trust/hosts/host-1/release", headers=own)
        assert release.status_code == 200 and release.json()["version"] == 1
        status = client.get("/v1/trust/hosts/host-1", headers=admin).json()
        assert (status["state"], status["booted_release"]) == ("unknown", 1)
        hosts = client.get("/v1/hosts", headers=admin).json()
        assert hosts[0]["attestation_state"] == "unknown"
        nonce = client.post("/v1/trust/hosts/host-1/nonce", headers=own).json()["nonce"]
        verdict = client.post(
            "/v1/trust/hosts/host-1/evidence",
            json={"nonce": nonce, "evidence": {"format": "nope"}},
            headers=own,
        ).json()
        assert (verdict["state"], verdict["reason"]) == ("untrusted", "evidence-malformed")
    with pytest.raises(NotFound):
        controller.attestation.status("nobody")
    with controller.db.read() as session:
        assert session.scalar(select(ReleaseRow.version)) == 1


def _host_info() -> Any:
    from fleetvisor.model.specs import HostInfo, ResourceVector

    return HostInfo(
        capacity=ResourceVector(vcpus=4000, memory=4096), cpu_model="test", driver="sim"
    )


async def test_an_unreachable_host_is_unknown_and_challenged_again_soon(
    fleet: InProcessFleet, measured: MeasuredHost
) -> None:
    _, verdict = await boot_and_challenge(fleet, measured)
    assert verdict.trusted
    fleet.unreachable.add("host-1")
    verdict = await fleet.controller.attestation.challenge("host-1")
    assert (verdict.state, verdict.reason) == ("unknown", "unreachable")
    assert fleet.controller.attestation.due() == []
    await fleet.clock.advance(16.0)  # type: ignore[attr-defined]
    assert fleet.controller.attestation.due() == ["host-1"]
    fleet.unreachable.discard("host-1")
    assert (await fleet.controller.attestation.challenge("host-1")).trusted
