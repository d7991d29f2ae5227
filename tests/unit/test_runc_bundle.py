"""The runc driver's pure parts: the OCI config it writes for a spec, its names, its IPAM
and its usage arithmetic. No root, no runc."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest

from fleetvisor.clock import RealClock
from fleetvisor.drivers.runc import PrerequisiteMissing, RuncDriver, bundle, check_prerequisites
from fleetvisor.drivers.runc.cgroups import CgroupStats
from fleetvisor.drivers.runc.driver import parse_capacity_limit
from fleetvisor.drivers.runc.layout import (
    Layout,
    check_agent_id,
    check_instance_id,
    default_agent_id,
)
from fleetvisor.drivers.runc.network import AddressPool, default_subnet, parse_subnet
from fleetvisor.drivers.runc.overlay import options as overlay_options
from fleetvisor.drivers.runc.usage import UsageSampler
from fleetvisor.errors import DriverError, InvalidInput
from fleetvisor.model.specs import InstanceSpec, ResourceVector

LAYOUT = Layout(Path("/var/lib/fleetvisor/runc-driver"), "ab12cd")
MIB = 1024 * 1024


def make_spec(
    *, command: list[str] | None = None, vcpus: int = 500, memory: int = 256, **env: str
) -> InstanceSpec:
    return InstanceSpec(
        id="0123456789abcdef",
        name="Web Server_1",
        image="example/web:1",
        command=command if command is not None else [],
        env=env,
        resources=ResourceVector(vcpus=vcpus, memory=memory, disk=1, net=100),
    )


def config_for(spec: InstanceSpec, image: dict[str, Any] | None = None) -> dict[str, Any]:
    return bundle.runtime_config(
        spec,
        image if image is not None else {"Cmd": ["serve"]},
        netns_path=str(LAYOUT.netns_path(spec.id)),
        cgroups_path=LAYOUT.cgroups_path(spec.id),
        pids_limit=512,
    )


# -- resources ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("millicores", "quota", "shares"),
    [
        (500, 50_000, 512),
        (1000, 100_000, 1024),
        (2500, 250_000, 2560),
        (5, 1_000, 5),
        (1, 1_000, 2),
    ],
)
def test_cpu_quota_and_shares_follow_millicores(millicores: int, quota: int, shares: int) -> None:
    cpu = config_for(make_spec(vcpus=millicores))["linux"]["resources"]["cpu"]
    assert cpu == {"quota": quota, "period": 100_000, "shares": shares}


def test_zero_cpu_and_memory_mean_unlimited() -> None:
    resources = config_for(make_spec(vcpus=0, memory=0))["linux"]["resources"]
    assert resources["cpu"] == {"shares": 1024}
    assert "memory" not in resources


def test_memory_and_pids_limits() -> None:
    resources = config_for(make_spec(memory=256))["linux"]["resources"]
    assert resources["memory"] == {"limit": 256 * MIB}
    assert resources["pids"] == {"limit": 512}
    assert resources["devices"] == [{"allow": False, "access": "rwm"}]


def test_with_resources_changes_cpu_and_memory_and_keeps_the_rest() -> None:
    config = config_for(make_spec(vcpus=500, memory=256))
    resized = bundle.with_resources(config, ResourceVector(vcpus=1500, memory=1024))
    assert resized["linux"]["resources"]["cpu"]["quota"] == 150_000
    assert resized["linux"]["resources"]["memory"] == {"limit": 1024 * MIB}
    assert resized["linux"]["resources"]["pids"] == {"limit": 512}
    assert resized["process"] == config["process"]
    assert config["linux"]["resources"]["cpu"]["quota"] == 50_000  # the original is untouched


# -- process -----------------------------------------------------------------------------


def test_command_replaces_entrypoint_and_cmd() -> None:
    image = {"Entrypoint": ["/entry.sh"], "Cmd": ["serve"]}
    process = config_for(make_spec(command=["sh", "-c", "echo hi"]), image)["process"]
    assert process["args"] == ["sh", "-c", "echo hi"]


@pytest.mark.parametrize(
    ("image", "args"),
    [
        (
            {"Entrypoint": ["/entry.sh"], "Cmd": ["serve", "--port=80"]},
            ["/entry.sh", "serve", "--port=80"],
        ),
        ({"Entrypoint": ["/entry.sh"]}, ["/entry.sh"]),
        ({"Cmd": ["sh"]}, ["sh"]),
        ({"Entrypoint": None, "Cmd": ["sh"]}, ["sh"]),
    ],
)
def test_without_command_the_image_entrypoint_and_cmd_run(
    image: dict[str, Any], args: list[str]
) -> None:
    assert config_for(make_spec(), image)["process"]["args"] == args


def test_nothing_to_run_is_refused_with_what_to_do() -> None:
    with pytest.raises(InvalidInput, match="give the instance a command"):
        config_for(make_spec(), {})


def test_env_merges_image_env_under_the_instances() -> None:
    image = {"Cmd": ["sh"], "Env": ["PATH=/bin", "MODE=image", "KEEP=1"]}
    env = config_for(make_spec(MODE="instance", EXTRA="x"), image)["process"]["env"]
    assert env == ["PATH=/bin", "MODE=instance", "KEEP=1", "EXTRA=x"]


def test_env_gets_a_default_path() -> None:
    env = config_for(make_spec(), {"Cmd": ["sh"]})["process"]["env"]
    assert env == [f"PATH={bundle.DEFAULT_PATH}"]


def test_env_names_with_equals_are_refused() -> None:
    with pytest.raises(InvalidInput, match="environment variable"):
        bundle.merge_env([], {"A=B": "c"})


def test_cwd_user_and_process_defaults() -> None:
    process = config_for(make_spec())["process"]
    assert process["cwd"] == "/"
    assert process["user"] == {"uid": 0, "gid": 0}
    assert process["terminal"] is False
    assert process["noNewPrivileges"] is True
    assert "rlimits" not in process
    assert "CAP_NET_RAW" in process["capabilities"]["bounding"]
    assert "CAP_SYS_ADMIN" not in process["capabilities"]["bounding"]
    image = {"Cmd": ["sh"], "WorkingDir": "/srv", "User": "1000:1000"}
    process = config_for(make_spec(), image)["process"]
    assert process["cwd"] == "/srv"
    assert process["user"] == {"uid": 1000, "gid": 1000}


PASSWD = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001:app:/home/app:/bin/sh\n"
GROUP = "root:x:0:\napp:x:1001:\nstaff:x:50:app\n"


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        ("", {"uid": 0, "gid": 0}),
        ("app", {"uid": 1000, "gid": 1001}),
        ("1000", {"uid": 1000, "gid": 1001}),
        ("4242", {"uid": 4242, "gid": 0}),
        ("app:staff", {"uid": 1000, "gid": 50}),
        ("app:7", {"uid": 1000, "gid": 7}),
    ],
)
def test_image_user_is_resolved_in_the_images_passwd(user: str, expected: dict[str, int]) -> None:
    assert bundle.resolve_user(user, PASSWD, GROUP) == expected


@pytest.mark.parametrize("user", ["ghost", "app:ghosts"])
def test_unknown_image_user_or_group_is_refused(user: str) -> None:
    with pytest.raises(InvalidInput, match="numeric"):
        bundle.resolve_user(user, PASSWD, GROUP)


# -- container ---------------------------------------------------------------------------


def test_namespaces_join_the_instances_netns() -> None:
    namespaces = config_for(make_spec())["linux"]["namespaces"]
    assert {n["type"] for n in namespaces} == {"pid", "ipc", "uts", "mount", "network"}
    (network,) = [n for n in namespaces if n["type"] == "network"]
    assert network["path"] == "/run/netns/fvab12cd-0123456789abcdef"
    assert all("path" not in n for n in namespaces if n["type"] != "network")


def test_cgroups_path_sits_under_the_agents_parent() -> None:
    config = config_for(make_spec())
    assert config["linux"]["cgroupsPath"] == "/fleetvisor-ab12cd/0123456789abcdef"


def test_hostname_root_mounts_and_masks() -> None:
    config = config_for(make_spec())
    assert config["hostname"] == "web-server-1"
    assert config["root"] == {"path": "rootfs", "readonly": False}
    destinations = [m["destination"] for m in config["mounts"]]
    assert destinations[:6] == ["/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys"]
    sys_mount = config["mounts"][5]
    assert "ro" in sys_mount["options"]
    assert "/proc/kcore" in config["linux"]["maskedPaths"]
    assert "/proc/sys" in config["linux"]["readonlyPaths"]


def test_hosts_file_is_bind_mounted_read_only() -> None:
    config = bundle.runtime_config(
        make_spec(),
        {"Cmd": ["sh"]},
        netns_path="/run/netns/x",
        cgroups_path="/fleetvisor-x/y",
        pids_limit=1,
        hosts_file="/state/hosts",
    )
    (hosts,) = [m for m in config["mounts"] if m["destination"] == "/etc/hosts"]
    assert hosts["source"] == "/state/hosts" and "ro" in hosts["options"]


@pytest.mark.parametrize(
    ("name", "hostname"), [("web-1", "web-1"), ("Ünïcode!!", "n-code"), ("---", "instance")]
)
def test_hostname_is_a_valid_label(name: str, hostname: str) -> None:
    assert bundle.hostname_for(name) == hostname
    assert len(bundle.hostname_for("x" * 200)) == 63


def test_overlay_lists_the_top_layer_first() -> None:
    text = overlay_options([Path("/l/base"), Path("/l/app")], Path("/i/upper"), Path("/i/work"))
    assert text == "lowerdir=/l/app:/l/base,upperdir=/i/upper,workdir=/i/work"
    with pytest.raises(DriverError, match="cannot take"):
        overlay_options([Path("/l/a:b")], Path("/u"), Path("/w"))


# -- names -------------------------------------------------------------------------------


def test_every_name_carries_the_agent_prefix_and_links_fit_in_15_bytes() -> None:
    iid = "0123456789abcdef0123456789abcdef"
    assert LAYOUT.container_id(iid).startswith("fvab12cd-")
    assert LAYOUT.netns(iid).startswith("fvab12cd-")
    for name in (LAYOUT.bridge, LAYOUT.host_veth(254), LAYOUT.peer_veth(254)):
        assert name.startswith("fvab12cd") and len(name) <= 15
    assert LAYOUT.cgroups_path(iid) == f"/fleetvisor-ab12cd/{iid}"
    assert LAYOUT.rootfs(iid).is_relative_to(LAYOUT.state_dir)


def test_default_agent_id_is_stable_per_state_dir(tmp_path: Path) -> None:
    first = default_agent_id(tmp_path / "a")
    assert first == default_agent_id(tmp_path / "a")
    assert first != default_agent_id(tmp_path / "b")
    assert check_agent_id(first) == first


@pytest.mark.parametrize("agent_id", ["", "toolong7", "UPPER", "a-b"])
def test_bad_agent_ids_are_refused(agent_id: str) -> None:
    with pytest.raises(InvalidInput, match="agent_id"):
        check_agent_id(agent_id)


@pytest.mark.parametrize("instance_id", ["", "../x", "a/b", ".hidden", "a b", "x" * 101])
def test_ids_that_cannot_name_a_container_are_refused(instance_id: str) -> None:
    with pytest.raises(InvalidInput, match="instance id"):
        check_instance_id(instance_id)


# -- network -----------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["10.0.0.0/24", "198.18.0.0/16", "198.18.1.5/24", "nonsense"])
def test_subnets_outside_the_project_range_are_refused(text: str) -> None:
    with pytest.raises(InvalidInput, match="198.18"):
        parse_subnet(text)


def test_default_subnet_is_a_project_24() -> None:
    subnet = default_subnet("ab12cd")
    assert subnet.prefixlen == 24
    assert subnet.subnet_of(ipaddress.IPv4Network("198.18.0.0/15"))


def test_address_pool_is_stable_persisted_and_reuses_released_addresses(tmp_path: Path) -> None:
    subnet = parse_subnet("198.19.7.0/24")
    pool = AddressPool(tmp_path / "network.json", subnet)
    a = pool.allocate("a")
    assert str(a.address) == "198.19.7.2" and a.index == 2  # .1 is the bridge
    assert pool.allocate("a") == a
    b = pool.allocate("b")
    assert str(b.address) == "198.19.7.3"
    reborn = AddressPool(tmp_path / "network.json", subnet)
    assert reborn.get("b") == b and reborn.count() == 2
    reborn.release("a")
    assert str(reborn.allocate("c").address) == "198.19.7.2"
    with pytest.raises(DriverError, match="keep the old subnet"):
        AddressPool(tmp_path / "network.json", parse_subnet("198.19.8.0/24")).get("b")


def test_address_pool_runs_out_with_advice(tmp_path: Path) -> None:
    pool = AddressPool(tmp_path / "network.json", parse_subnet("198.19.9.0/24"))
    for i in range(253):
        pool.allocate(f"i{i}")
    with pytest.raises(DriverError, match="no free address"):
        pool.allocate("one-too-many")


# -- usage -------------------------------------------------------------------------------


def stats(cpu_seconds: float, memory_mib: int = 10) -> CgroupStats:
    return CgroupStats(
        cpu_usage_ns=int(cpu_seconds * 1e9),
        throttled_periods=3,
        throttled_ns=500_000_000,
        memory_bytes=memory_mib * MIB,
        memory_max_bytes=memory_mib * 2 * MIB,
        oom_kills=1,
        pids=4,
    )


def test_cpu_rate_is_measured_since_the_previous_sample() -> None:
    sampler = UsageSampler(min_interval=1.0)
    first = sampler.usage("i", 100.0, stats(2.0), 0, 0, uptime=4.0)
    assert first["cpu_millicores"] == pytest.approx(500)  # since start: 2 s of CPU in 4 s
    second = sampler.usage("i", 102.0, stats(3.0), 1000, 250_000, uptime=6.0)
    assert second["cpu_millicores"] == pytest.approx(500)  # 1 s of CPU in 2 s
    assert second["net_mbps"] == pytest.approx(251_000 * 8 / 1e6 / 2)
    assert second["cpu_usage_seconds"] == 3.0
    assert second["throttled_seconds"] == 0.5 and second["throttled_periods"] == 3
    assert second["memory_mib"] == 10 and second["memory_max_mib"] == 20
    assert (second["oom_kills"], second["pids"]) == (1, 4)
    assert (second["net_rx_bytes"], second["net_tx_bytes"]) == (1000, 250_000)


def test_a_quick_second_sample_does_not_move_the_baseline() -> None:
    sampler = UsageSampler(min_interval=1.0)
    sampler.usage("i", 100.0, stats(0.0), 0, 0, uptime=None)
    sampler.usage("i", 100.01, stats(0.0), 0, 0, uptime=None)
    later = sampler.usage("i", 102.0, stats(1.0), 0, 0, uptime=None)
    assert later["cpu_millicores"] == pytest.approx(500)  # over 2 s, not 1.99 s of noise


def test_a_stopped_instance_reports_zeros_and_restarts_its_rate() -> None:
    sampler = UsageSampler()
    sampler.usage("i", 100.0, stats(5.0), 0, 0, uptime=10.0)
    stopped = sampler.usage("i", 101.0, None, 7, 9, uptime=None)
    assert stopped["cpu_millicores"] == 0 and stopped["memory_mib"] == 0
    assert (stopped["net_rx_bytes"], stopped["net_tx_bytes"]) == (7, 9)
    restarted = sampler.usage("i", 102.0, stats(0.5), 0, 0, uptime=1.0)
    assert restarted["cpu_millicores"] == pytest.approx(500)


# -- options -----------------------------------------------------------------------------


def test_capacity_option_overrides_only_the_given_dimensions() -> None:
    assert parse_capacity_limit("") == {}
    assert parse_capacity_limit("cpu=1.5, memory=4G") == {"vcpus": 1500, "memory": 4096}
    assert parse_capacity_limit("disk=20,net=100") == {"disk": 20, "net": 100}
    with pytest.raises(InvalidInput, match="unknown capacity key"):
        parse_capacity_limit("gpus=1")


def test_unknown_driver_options_are_refused_with_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="subnet"):
        RuncDriver.from_options(
            clock=RealClock(),
            state_dir=tmp_path,
            options={"seed": "0"},
            rootfs=None,  # type: ignore[arg-type]
        )


# -- prerequisites -----------------------------------------------------------------------


def test_missing_runc_says_what_to_install() -> None:
    with pytest.raises(PrerequisiteMissing, match="apt-get install runc"):
        check_prerequisites("definitely-not-runc")


def test_a_pure_cgroup_v2_host_is_named_as_such(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    with pytest.raises(PrerequisiteMissing, match="cgroup v2"):
        check_prerequisites(cgroup_root=tmp_path)


def test_missing_v1_controllers_are_listed(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    with pytest.raises(PrerequisiteMissing, match="'memory' is not mounted"):
        check_prerequisites(cgroup_root=tmp_path)
