"""SimDriver: instances are records, not processes; they outlive the agent process.

State is written to `state_dir/sim-instances.json` after every change, the way a real
runtime's containers survive an agent restart; a restarted agent re-reports them.

Fault injection (as Nova's fake drivers do), through instance labels:
  sim.fleetvisor.io/create-seconds: "5"   create takes this long (clock time)
  sim.fleetvisor.io/fail: "create"|"start" that call fails
  sim.fleetvisor.io/faults: "throttled=0.8@5;oom@8;cpu_wait=0.9@3;exit@12;probe=fail@2"
        what goes wrong, by seconds since the instance's latest start (see
        workload.FaultSchedule and drivers/README.md): the counters execution monitoring
        reads (throttled share, run-queue wait, memory in use, OOM kills), an exit of
        the main process, and what `exec` (an exec probe) answers

A service's load, for local scaling (the group is an instance and the siblings carved
from it, which carry `fleetvisor.io/parent`):
  sim.fleetvisor.io/demand: "300;1600@10;300@40"   millicores the group's service asks
        for, by seconds since the parent started; shared evenly by the running members
  sim.fleetvisor.io/worker-millicores: "1000"      the most one member can use (one worker)
"""

from __future__ import annotations

import functools
import json
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path

from fleetvisor.clock import Clock
from fleetvisor.drivers.base import Capability, UnknownInstance
from fleetvisor.drivers.sim.workload import FaultSchedule, WorkloadModel
from fleetvisor.errors import DriverError
from fleetvisor.model.resources import Resources
from fleetvisor.model.resources import parse_capacity as parse_capacity_overrides
from fleetvisor.model.scaling import PARENT_LABEL
from fleetvisor.model.specs import (
    HostInfo,
    InstanceReport,
    InstanceSpec,
    ResourceVector,
    spec_labels,
)

LABEL_PREFIX = "sim.fleetvisor.io/"
DEFAULT_CAPACITY = Resources(vcpus=16_000, memory=65_536, disk=500, net=10_000)
CFS_PERIOD_S = 0.1  # the period simulated CPU quotas are enforced over, as runc's
COUNTERS = ("cpu_periods", "throttled_periods", "throttled_seconds", "cpu_wait_seconds",
            "oom_kills", "pids", "memory_limit_mib")  # fmt: skip


def parse_capacity(text: str) -> Resources:
    """'cpu=16,memory=64G,disk=500,net=10000' -> Resources (missing keys keep the default)."""
    return Resources(**{**DEFAULT_CAPACITY.as_dict(), **parse_capacity_overrides(text)})


class SimDriver:
    kind = "sim"

    def __init__(
        self,
        *,
        clock: Clock,
        state_dir: Path,
        capacity: Resources = DEFAULT_CAPACITY,
        seed: int = 0,
        persist: bool = True,
    ) -> None:
        self.clock = clock
        self.capacity = capacity
        self.workload = WorkloadModel(seed=seed)
        self._path = state_dir / "sim-instances.json" if persist else None
        self._logs = state_dir / "logs" if persist else None
        self._instances: dict[str, dict] = {}
        if self._path and self._path.exists():
            self._instances = json.loads(self._path.read_text())

    @classmethod
    def from_options(cls, *, clock: Clock, state_dir: Path, options: dict[str, str]) -> SimDriver:
        capacity = parse_capacity(options.get("capacity", ""))
        return cls(
            clock=clock, state_dir=state_dir, capacity=capacity, seed=int(options.get("seed", "0"))
        )

    def host_info(self) -> HostInfo:
        return HostInfo(
            capacity=ResourceVector.of(self.capacity),
            cpu_model=f"simulated {platform.machine() or 'x86_64'}",
            cpu_features=["sse4_2", "avx2"],
            driver=self.kind,
            capabilities=sorted(self.capabilities()),
        )

    def capabilities(self) -> set[Capability]:
        return {Capability.RESIZE_LIVE}

    async def create(self, spec: InstanceSpec) -> InstanceReport:
        if spec.id in self._instances:
            return self._report(spec.id)
        knobs = spec_labels(spec, LABEL_PREFIX)
        try:
            faults_of(str(knobs.get("faults", "")))
        except ValueError as exc:
            raise DriverError(str(exc)) from None
        if knobs.get("fail") == "create":
            raise DriverError(f"simulated create failure for {spec.name}")
        delay = float(knobs.get("create-seconds", 0) or 0)
        if delay > 0:
            await self.clock.sleep(delay)
        self._instances[spec.id] = {
            "spec": spec.model_dump(),
            "state": "created",
            "started_at": None,
            "created_at": self.clock.now(),
        }
        self._save()
        self._log(spec.id, f"created from image {spec.image} with {spec.resources}")
        return self._report(spec.id)

    async def start(self, instance_id: str) -> InstanceReport:
        record = self._get(instance_id)
        if spec_labels(InstanceSpec(**record["spec"]), LABEL_PREFIX).get("fail") == "start":
            raise DriverError(f"simulated start failure for {record['spec']['name']}")
        if record["state"] != "running":
            record.update(state="running", started_at=self.clock.now())
            self._save()
            command = " ".join(record["spec"]["command"]) or "(image default command)"
            self._log(instance_id, f"started: {command}")
        return self._report(instance_id)

    async def stop(self, instance_id: str) -> InstanceReport:
        record = self._get(instance_id)
        if record["state"] == "running":
            record.update(state="stopped", started_at=None)
            self._save()
            self._log(instance_id, "stopped")
        return self._report(instance_id)

    async def destroy(self, instance_id: str) -> None:
        if self._instances.pop(instance_id, None) is not None:
            self._save()
            log = self.log_path(instance_id)
            if log is not None:
                log.unlink(missing_ok=True)

    async def resize(self, instance_id: str, resources: Resources) -> InstanceReport:
        record = self._get(instance_id)
        record["spec"]["resources"] = resources.as_dict()
        self._save()
        self._log(instance_id, f"resized to {resources.describe()}")
        return self._report(instance_id)

    async def stats(self, instance_id: str) -> dict[str, float]:
        self._get(instance_id)
        self._settle(instance_id)
        return self._usage(instance_id)

    async def list(self) -> list[InstanceReport]:
        for instance_id in list(self._instances):
            self._settle(instance_id)
        return [self._report(i) for i in sorted(self._instances)]

    async def exec(self, instance_id: str, argv: Sequence[str], timeout: float) -> tuple[int, str]:
        """Run a command in the instance (an exec probe): (exit code, output). Nothing runs;
        the `probe` fault decides the answer (ok: 0, fail: 1, timeout: no answer)."""
        record = self._get(instance_id)
        self._settle(instance_id)
        if record["state"] != "running":
            raise DriverError(f"instance {instance_id} is not running; nothing to exec in")
        answer = self._faults(record).level("probe", self._age(record), "ok")
        if answer == "timeout":
            await self.clock.sleep(timeout)
            raise DriverError(f"{' '.join(argv)!r} did not finish within {timeout:g} s")
        if answer == "fail":
            return 1, f"{argv[0] if argv else 'command'}: simulated failure"
        return 0, ""

    def log_path(self, instance_id: str) -> Path | None:
        return self._logs / f"{instance_id}.log" if self._logs is not None else None

    def _log(self, instance_id: str, message: str) -> None:
        path = self.log_path(instance_id)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.clock.now()))
        with path.open("a") as log:
            log.write(f"{stamp}Z sim: {message}\n")

    async def close(self) -> None:
        self._save()

    def _settle(self, instance_id: str) -> None:
        """An `exit` fault whose time came: the main process ended, the instance stopped."""
        record = self._instances[instance_id]
        if record["state"] != "running":
            return
        exit_at = self._faults(record).first("exit")
        if exit_at is not None and self._age(record) >= exit_at:
            record.update(state="stopped", started_at=None)
            self._save()
            self._log(instance_id, f"exited {exit_at:g} s after its start (simulated fault)")

    def _age(self, record: dict) -> float:
        """Seconds since the instance's latest start."""
        return self.clock.now() - (record["started_at"] or self.clock.now())

    @staticmethod
    def _faults(record: dict) -> FaultSchedule:
        return faults_of(str(record["spec"]["labels"].get(LABEL_PREFIX + "faults", "")))

    def _usage(self, instance_id: str) -> dict[str, float]:
        record = self._get(instance_id)
        if record["state"] != "running":
            return {"cpu_millicores": 0.0, "memory_mib": 0.0, "net_mbps": 0.0} | dict.fromkeys(
                COUNTERS, 0.0
            )
        now = self.clock.now()
        knobs = spec_labels(InstanceSpec(**record["spec"]), LABEL_PREFIX)
        alloc = record["spec"]["resources"]
        if "demand" in knobs:
            usage = self._service_usage(instance_id, record, knobs, now)
        else:
            fractions = self.workload.usage(instance_id, now, self._age(record))
            usage = {
                "cpu_millicores": fractions["cpu"] * alloc["vcpus"],
                "memory_mib": fractions["memory"] * alloc["memory"],
                "net_mbps": fractions["net"] * alloc["net"],
            }
        return usage | self._counters(record, alloc)

    def _counters(self, record: dict, alloc: dict) -> dict[str, float]:
        """The cumulative counters a real driver reads from cgroups, from the fault schedule."""
        faults = self._faults(record)
        age = self._age(record)
        throttled = faults.integral("throttled", age)  # seconds held back by the quota
        counters = {
            "cpu_periods": age / CFS_PERIOD_S,
            "throttled_periods": throttled / CFS_PERIOD_S,
            "throttled_seconds": throttled,
            "cpu_wait_seconds": faults.integral("cpu_wait", age),
            "oom_kills": faults.count("oom", age),
            "pids": 1.0,
            "memory_limit_mib": float(alloc["memory"]),
        }
        memory = faults.level("memory", age, -1.0)
        if isinstance(memory, float) and memory >= 0:
            counters["memory_mib"] = memory * alloc["memory"]
        return counters

    def _service_usage(
        self, instance_id: str, record: dict, knobs: dict, now: float
    ) -> dict[str, float]:
        """A member's share of its group's demand, capped by its allocation and worker."""
        group = record["spec"]["labels"].get(PARENT_LABEL, instance_id)
        root = self._instances.get(group, record)
        members = [
            r
            for i, r in self._instances.items()
            if r["state"] == "running"
            and (i == group or r["spec"]["labels"].get(PARENT_LABEL) == group)
        ]
        demand = demand_at(str(knobs["demand"]), now - (root["started_at"] or now))
        alloc = record["spec"]["resources"]
        cap = min(float(alloc["vcpus"]), float(knobs.get("worker-millicores") or alloc["vcpus"]))
        cpu = min(demand / max(len(members), 1), cap)
        return {
            "cpu_millicores": cpu,
            "memory_mib": 0.25 * alloc["memory"],
            "net_mbps": 0.0,
        }

    def _get(self, instance_id: str) -> dict:
        try:
            return self._instances[instance_id]
        except KeyError:
            raise UnknownInstance(instance_id) from None

    def _report(self, instance_id: str) -> InstanceReport:
        self._settle(instance_id)
        record = self._instances[instance_id]
        spec = record["spec"]
        return InstanceReport(
            id=instance_id,
            name=spec["name"],
            state=record["state"],
            resources=ResourceVector(**spec["resources"]),
            started_at=record["started_at"],
            usage=self._usage(instance_id),
        )

    def _save(self) -> None:
        if self._path is None:
            return
        self._path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._instances))
        os.replace(tmp, self._path)


@functools.lru_cache(maxsize=1024)
def faults_of(text: str) -> FaultSchedule:
    """The parsed `faults` label (ValueError naming the syntax when it cannot be read)."""
    return FaultSchedule(text)


def demand_at(schedule: str, seconds: float) -> float:
    """'300;1600@10;300@40' -> the millicores asked for `seconds` after the start."""
    value = 0.0
    for step in schedule.split(";"):
        amount, _, since = step.strip().partition("@")
        try:
            if seconds >= float(since or 0):
                value = float(amount)
        except ValueError:
            raise DriverError(
                f"sim demand {schedule!r}: use millicores[@seconds];... e.g. 300;1600@10"
            ) from None
    return value
