"""A host joins the fleet only after proving what it booted: real swtpm, real agent processes.

The controller runs in this process (its API on a loopback socket, its loops live);
each boot is a real `fleetvisor agent --measured-boot --swtpm` process, run from a copy
of the fleetvisor package (so the measured agent code is the code that runs) with a
stand-in runc binary and a release installed under releases/v<N>/. The operator steps
are the real CLI: release keygen / sign / publish, host enroll.

Every test boots clean first (trusted), then stages one attack: a changed byte in a
measured component, a replayed quote, a manifest signed by another key, a rollback.
Everything lives in one temp dir (prefix fv-attest-); agents and their swtpms are
stopped by PID, even when a test fails. Skipped, with the reason printed, where swtpm
or tpm2-tools are missing.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from sqlalchemy import delete

import fleetvisor
from fleetvisor.api.app import create_app
from fleetvisor.client import ApiError, FleetClient
from fleetvisor.controller.core import Controller
from fleetvisor.controller.settings import ControllerSettings
from fleetvisor.model.specs import HostInfo, ResourceVector
from fleetvisor.store.tables import HostRow, ReleaseRow
from fleetvisor.trust.config import LoaderConfig
from fleetvisor.trust.swtpm import missing_swtpm
from fleetvisor.trust.tpm import missing_tools

MISSING = missing_swtpm() or missing_tools()
if MISSING:
    print(f"\nskipping the attested fleet tests: {MISSING}")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(MISSING is not None, reason=MISSING or ""),
]

HOST = "trusted-1"
PLAIN = "plain-1"  # registered, never enrolled: `unknown`
SETTINGS = ControllerSettings(
    heartbeat_interval=1.0,
    down_after_missed=120,  # the stand-in plain host never heartbeats
    attestation_interval=3600.0,
    attestation_poll_interval=0.2,
)
BOOT_TIMEOUT = 60.0


class ControllerThread:
    """The controller's API and loops in a thread of this process, on 127.0.0.1:<free>."""

    def __init__(self, state_dir: Path) -> None:
        self.controller = Controller(state_dir=state_dir, settings=SETTINGS)
        self.controller.prepare()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        app = create_app(self.controller)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(
            target=lambda: asyncio.run(self.server.serve(sockets=[self.sock])), daemon=True
        )

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "controller start"
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(20)
        self.sock.close()
        self.controller.db.dispose()


class AttestedHost:
    """The host's files (a copy of the package, a driver binary, loader config, releases),
    the operator's keys and CLI, and the agent process of the current boot."""

    def __init__(self, root: Path, controller: ControllerThread) -> None:
        self.root = root
        self.controller = controller
        self.site = root / "site"
        self.code = self.site / "fleetvisor"
        shutil.copytree(
            Path(fleetvisor.__file__).parent,
            self.code,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
        self.runc = root / "drivers" / "runc"
        self.runc.parent.mkdir()
        self.runc.write_bytes(b"\x7fELF stand-in for runc\n" + bytes(4096))
        self.releases = root / "releases"
        self.state = root / "state"
        self.tpm_dir = root / "tpm"
        self.key = root / "keys" / "release.key"
        self.key.parent.mkdir()
        self.loader = root / "loader.json"
        LoaderConfig(
            stage1_manifest=root / "stage1.json",
            agent_code=self.code,
            drivers={"runc": self.runc},
            release_public_key_file=root / "release.pub",
        ).write(self.loader)
        self.process: subprocess.Popen[bytes] | None = None
        self.log = root / "agent.log"

    # -- the operator's CLI ---------------------------------------------------------------

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            "FLEETVISOR_URL": self.controller.url,
            "FLEETVISOR_TOKEN": self.controller.controller.admin_token,
            "FLEETVISOR_HOME": str(self.root / "home"),
        }
        done = subprocess.run(
            [sys.executable, "-B", "-m", "fleetvisor", *args],
            env=env,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check:
            assert done.returncode == 0, f"fleetvisor {' '.join(args)}:\n{done.stderr}"
        return done

    def install_release(self, version: int) -> Path:
        tree = self.releases / f"v{version}" / "coordinator"
        tree.mkdir(parents=True, exist_ok=True)
        (tree / "coordinator.py").write_text(
            f'"""coordinator, release {version}."""\nV = {version}\n'
        )
        return tree

    def sign_release(self, version: int, key: Path | None = None) -> Path:
        out = self.root / f"release-v{version}.json"
        tree = self.install_release(version)
        self.cli(
            "release", "sign", "--key", str(key or self.key), "--version", str(version),
            "--label", f"v{version}", "--component", f"coordinator={tree}", "--out", str(out),
        )  # fmt: skip
        return out

    def sign_stage1(self, key: Path | None = None) -> None:
        self.cli(
            "release", "sign", "--stage", "stage1", "--key", str(key or self.key),
            "--version", "1", "--loader-config", str(self.loader),
        )  # fmt: skip

    def set_up(self) -> None:
        """keygen, stage-1 manifest, release 1 published, TPM enrolled."""
        self.cli("release", "keygen", "--out", str(self.key))
        self.sign_stage1()
        publish = self.cli(
            "release", "publish", str(self.sign_release(1)), "--public-key",
            str(self.key.with_suffix(".pub")), "--json",
        )  # fmt: skip
        assert json.loads(publish.stdout)["version"] == 1
        enrol = self.cli(
            "host", "enroll", HOST, "--public-key", str(self.key.with_suffix(".pub")),
            "--tpm-dir", str(self.tpm_dir), "--swtpm", "--key-file", str(self.root / "release.pub"),
            "--json",
        )  # fmt: skip
        assert json.loads(enrol.stdout)["host"] == HOST

    # -- boots ----------------------------------------------------------------------------

    def start_agent(self) -> float:
        self.stop_agent()
        started = time.time()
        env = {**os.environ, "PYTHONPATH": str(self.site), "PYTHONDONTWRITEBYTECODE": "1"}
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable, "-B", "-m", "fleetvisor", "agent",
                    "--controller", self.controller.url, "--name", HOST, "--driver", "sim",
                    "--state-dir", str(self.state), "--measured-boot",
                    "--loader-config", str(self.loader), "--tpm-dir", str(self.tpm_dir),
                    "--swtpm", "--release-dir", str(self.releases),
                ],
                env={**env, "FLEETVISOR_TOKEN": self.controller.controller.admin_token},
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        return started

    def stop_agent(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(5)

    def boot(self) -> dict[str, Any]:
        """Start the agent; wait for the controller's verdict on this boot. Returns the
        host's attestation status with `exit` = the agent's exit code (None: running)."""
        started = self.start_agent()
        assert self.process is not None
        deadline = time.monotonic() + BOOT_TIMEOUT
        while time.monotonic() < deadline:
            host = self.host_row()
            if host is not None and host.attested_at is not None and host.attested_at > started:
                if host.attestation_state != "trusted":
                    self.wait_exit()
                status = self.controller.controller.attestation.status(HOST)
                return {**status, "exit": self.process.poll() if self.process else None}
            if self.process.poll() not in (None, 1):
                break
            time.sleep(0.1)
        raise AssertionError(f"no verdict for the boot; agent log:\n{self.log.read_text()[-3000:]}")

    def wait_exit(self) -> None:
        if self.process is not None:
            self.process.wait(BOOT_TIMEOUT)

    def clean_boot(self) -> dict[str, Any]:
        status = self.boot()
        assert status["state"] == "trusted", (status, self.log.read_text()[-3000:])
        return status

    def host_row(self) -> HostRow | None:
        try:
            return self.controller.controller.hosts.get(HOST)
        except Exception:
            return None


def last_boot_refusal(fleet: AttestedHost) -> dict[str, Any]:
    shown = fleet.cli("events", "--kind", "host.boot_refused", "--json", "--limit", "1")
    events = [json.loads(line) for line in shown.stdout.splitlines() if line.strip()]
    assert events, "no host.boot_refused event"
    data: dict[str, Any] = events[-1]["data"]
    return data


def register_plain(controller: ControllerThread) -> None:
    """A ready host that never enrolled (its agent is a stand-in that never answers)."""
    controller.controller.hosts.register(
        name=PLAIN,
        cluster="default",
        agent_url="http://127.0.0.1:9",
        agent_token="p" * 32,
        info=HostInfo(
            capacity=ResourceVector(vcpus=64_000, memory=65_536, disk=100, net=1000),
            cpu_model="stand-in",
            driver="sim",
        ),
        labels={},
        instances=[],
    )


@contextmanager
def flipped_byte(path: Path, at: int | None = None, to: bytes | None = None) -> Iterator[None]:
    original = path.read_bytes()
    offset = len(original) // 2 if at is None else at
    changed = bytearray(original)
    changed[offset] = to[0] if to else changed[offset] ^ 0x01
    path.write_bytes(bytes(changed))
    try:
        yield
    finally:
        path.write_bytes(original)


@pytest.fixture(scope="module")
def fleet() -> Iterator[AttestedHost]:
    root = Path(tempfile.mkdtemp(prefix="fv-attest-"))
    controller = ControllerThread(root / "controller")
    host: AttestedHost | None = None
    try:
        controller.start()
        register_plain(controller)
        host = AttestedHost(root / "host", controller)
        host.set_up()
        yield host
    finally:
        if host is not None:
            host.stop_agent()
        controller.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_a_clean_boot_is_trusted(fleet: AttestedHost) -> None:
    status = fleet.clean_boot()
    assert status["exit"] is None  # the agent runs and takes instances
    summary = status["verdict"]["summary"]
    assert summary["release_version"] == 1
    assert set(summary["components"]["stage1"]) == {"loader-config", "agent-code", "driver:runc"}
    hosts = json.loads(fleet.cli("hosts", "--json").stdout)
    assert {h["name"]: h["attestation_state"] for h in hosts} == {
        HOST: "trusted",
        PLAIN: "unknown",
    }
    assert "trusted" in fleet.cli("hosts").stdout


@pytest.mark.parametrize("target", ["agent-code", "driver:runc", "loader-config", "coordinator"])
def test_one_changed_byte_keeps_the_host_out(fleet: AttestedHost, target: str) -> None:
    fleet.clean_boot()
    paths = {
        "agent-code": fleet.code / "agent" / "README.md",  # bytes that do not break the code
        "driver:runc": fleet.runc,
        "loader-config": fleet.loader,
        "coordinator": fleet.releases / "v1" / "coordinator" / "coordinator.py",
    }
    path = paths[target]
    at, to = (path.read_bytes().index(b"  "), b"\t") if target == "loader-config" else (None, None)
    with flipped_byte(path, at, to):
        status = fleet.boot()
    assert status["exit"] not in (None, 0), "a refused boot must not run the agent"
    assert (status["state"], status["reason"]) == ("untrusted", "component-mismatch"), status
    finding = status["verdict"]["findings"][0]
    assert finding["component"] == target and finding["expected"] != finding["measured"]
    refusal = last_boot_refusal(fleet)  # the event log says what and why, precisely
    assert (refusal["component"], refusal["reason"]) == (target, "digest-mismatch")
    assert refusal["expected"] == finding["expected"] and refusal["measured"] == finding["measured"]


def test_a_replayed_quote_leaves_the_host_untrusted(fleet: AttestedHost) -> None:
    fleet.clean_boot()
    host = fleet.host_row()
    assert host is not None
    agent_token = (fleet.state / "agent.token").read_text().strip()
    old_nonce = secrets.token_hex(32)
    old = httpx.post(
        f"{host.agent_url}/v1/attestation",
        json={"nonce": old_nonce},
        headers={"Authorization": f"Bearer {agent_token}"},
        timeout=30,
    )
    assert old.status_code == 200, old.text
    with FleetClient(fleet.controller.url, fleet.controller.controller.admin_token) as client:
        fresh = client.attestation_nonce(HOST)
        verdict = client.submit_evidence(HOST, fresh, old.json())
        assert (verdict["state"], verdict["reason"]) == ("untrusted", "stale-nonce")
        assert client.host_attestation(HOST)["state"] == "untrusted"
        assert client.attest_host(HOST)["state"] == "trusted"  # a fresh challenge: trusted


def test_a_manifest_signed_by_another_key_is_refused(fleet: AttestedHost) -> None:
    fleet.clean_boot()
    other = fleet.root / "keys" / "other.key"
    if not other.exists():
        fleet.cli("release", "keygen", "--out", str(other))
    refused = fleet.cli("release", "publish", str(fleet.sign_release(7, key=other)), check=False)
    assert refused.returncode != 0 and "not by the trusted release key" in refused.stderr
    stage1 = fleet.root / "stage1.json"
    original = stage1.read_bytes()
    try:
        fleet.sign_stage1(key=other)
        status = fleet.boot()
    finally:
        stage1.write_bytes(original)
    assert status["exit"] not in (None, 0)
    assert (status["state"], status["reason"]) == ("untrusted", "manifest-signature"), status


def test_instances_requiring_trust_land_only_on_trusted_hosts(fleet: AttestedHost) -> None:
    fleet.clean_boot()
    register_plain(fleet.controller)
    run = fleet.cli(
        "run", "vault-1", "--image", "busybox", "--cpu", "0.5", "--memory", "64M", "--secure",
        "--json",
    )  # fmt: skip
    placed = json.loads(run.stdout)["instance"]
    assert placed["host"] == HOST and placed["trusted_host"] is True
    with flipped_byte(fleet.runc):
        assert fleet.boot()["state"] == "untrusted"
    refused = fleet.cli(
        "run", "vault-2", "--image", "busybox", "--cpu", "0.5", "--memory", "64M",
        "--trusted-host", "--json",
    check=False)  # fmt: skip
    assert refused.returncode != 0 and "trusted" in refused.stderr, refused.stderr
    plain = json.loads(
        fleet.cli("run", "web-1", "--image", "busybox", "--no-wait", "--json").stdout
    )
    assert plain["instance"]["host"] == PLAIN  # untrusted hosts take nothing at all


def test_a_rollback_to_an_older_release_is_refused(fleet: AttestedHost) -> None:
    fleet.clean_boot()
    fleet.cli("release", "publish", str(fleet.sign_release(2)))
    status = fleet.clean_boot()
    assert status["verdict"]["summary"]["release_version"] == 2
    assert status["min_release_version"] == 2
    # The controller's database comes back from an old backup: only release 1 is known.
    with fleet.controller.controller.db.write() as session:
        session.execute(delete(ReleaseRow).where(ReleaseRow.version == 2))
    status = fleet.boot()
    assert status["exit"] not in (None, 0)
    assert (status["state"], status["reason"]) == ("untrusted", "rollback"), status
    assert last_boot_refusal(fleet)["reason"] == "rollback"  # the TPM counter refused it first
    with pytest.raises(ApiError):
        FleetClient(fleet.controller.url, "wrong").host_attestation(HOST)
