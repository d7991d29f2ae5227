"""SimDriver: instances are records, not processes; they outlive the agent process.

State is written to `state_dir/sim-instances.json` after every change, the way a real
runtime's containers survive an agent restart; a restarted agent re-reports them.

Fault injection (as Nova's fake drivers do), through instance labels:
  sim.fleetvisor.io/create-seconds: "5"   create takes this long (clock time)
  sim.fleetvisor.io/fail: "create"|"start" that call fails

A service's load, for local scaling (the group is an instance and the siblings carved
from it, which carry `fleetvisor.io/parent`):
  sim.fleetvisor.io/demand: "300;1600@10;300@40"   millicores the group's service asks
        for, by seconds since the parent started; shared evenly by the running members
  sim.fleetvisor.io/worker-millicores: "1000"      the most one member can use (one worker)
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

from fleetvisor.clock import Clock
from fleetvisor.drivers.base import Capability, UnknownInstance
from fleetvisor.drivers.sim.workload import WorkloadModel
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
        return self._usage(instance_id)

    async def list(self) -> list[InstanceReport]:
        return [self._report(i) for i in sorted(self._instances)]

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

    def _usage(self, instance_id: str) -> dict[str, float]:
        record = self._get(instance_id)
        if record["state"] != "running":
            return {"cpu_millicores": 0.0, "memory_mib": 0.0, "net_mbps": 0.0}
        now = self.clock.now()
        knobs = spec_labels(InstanceSpec(**record["spec"]), LABEL_PREFIX)
        if "demand" in knobs:
            return self._service_usage(instance_id, record, knobs, now)
        fractions = self.workload.usage(instance_id, now, now - (record["started_at"] or now))
        alloc = record["spec"]["resources"]
        return {
            "cpu_millicores": fractions["cpu"] * alloc["vcpus"],
            "memory_mib": fractions["memory"] * alloc["memory"],
            "net_mbps": fractions["net"] * alloc["net"],
        }

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
