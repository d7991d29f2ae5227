"""The host's local scaling managers: one loop per instance with a scaling policy.

    instance with a policy starts ──► manager loop (every sample_interval)
        stats of parent + siblings ──► GroupSampler ──► TriggerState.observe
        carve: resize parent down ─► create + start sibling (same spec, carved share)
               ─► sibling answers ─► joins the service endpoint ─► notice "carved"
        fold:  drain sibling at the endpoint ─► destroy it ─► resize parent up
               ─► notice "folded"
    notices ──► the next heartbeat (sent at once) ──► controller: events, accounting

Resources are conserved at every step: the parent shrinks before a sibling starts and
grows only after the sibling is gone, so the instances' limits never sum to more than
the parent's size. Each group's state is written to `state_dir/scaling/` before every
step, and `restore()` settles a step a crash interrupted: siblings the driver lost are
dropped, and the parent is resized to its size minus the siblings that exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fleetvisor.agent.scaling.balancer import ServiceBalancer
from fleetvisor.agent.scaling.decide import TriggerState
from fleetvisor.agent.scaling.metrics import GroupSampler
from fleetvisor.agent.scaling.probe import http_probe_ms
from fleetvisor.drivers.base import UnknownInstance
from fleetvisor.errors import FleetvisorError
from fleetvisor.model.resources import Resources
from fleetvisor.model.scaling import PARENT_LABEL, ScalingNotice, ScalingPolicy, carve
from fleetvisor.model.specs import InstanceReport, InstanceSpec, ResourceVector

if TYPE_CHECKING:
    from fleetvisor.agent.core import Agent

log = logging.getLogger("fleetvisor.agent.scaling")

READY_TIMEOUT = 10.0  # a sibling's service must answer within this after its start
DRAIN_TIMEOUT = 30.0
MAX_NOTICES = 1000


@dataclass
class Group:
    """A parent instance with a policy, and the siblings carved from it (persisted)."""

    parent: str
    spec: dict[str, Any]  # the parent's spec at full size
    policy: dict[str, Any]
    children: dict[str, dict[str, Any]] = field(default_factory=dict)
    seq: int = 0
    listen_port: int = 0

    @property
    def full(self) -> Resources:
        return ResourceVector(**self.spec["resources"]).to_resources()

    @property
    def carved(self) -> Resources:
        total = Resources()
        for child in self.children.values():
            total = total + Resources(**child["resources"])
        return total

    @property
    def parent_share(self) -> Resources:
        return self.full - self.carved


class ScalingSupervisor:
    def __init__(
        self,
        agent: Agent,
        state_dir: Path | None = None,
        service_host: str = "127.0.0.1",
        sample_interval: float = 0.25,
        window: float = 1.0,
    ) -> None:
        self.agent = agent
        self.clock = agent.clock
        self.service_host = service_host
        self.sample_interval = sample_interval
        self.window = window
        self.dir = state_dir / "scaling" if state_dir is not None else None
        self.groups: dict[str, Group] = {}
        self.notices: list[ScalingNotice] = []
        self.on_notice: Callable[[], None] | None = None  # e.g. send a heartbeat now
        self.last_values: dict[str, dict[str, float]] = {}
        self._loops: dict[str, asyncio.Task[None]] = {}
        self._balancers: dict[str, ServiceBalancer] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        if self.dir is not None and self.dir.is_dir():
            for path in sorted(self.dir.glob("*.json")):
                group = Group(**json.loads(path.read_text()))
                self.groups[group.parent] = group

    # -- what the agent asks --------------------------------------------------------------

    def parent_of(self, instance_id: str) -> str | None:
        for group in self.groups.values():
            if instance_id in group.children:
                return group.parent
        return None

    async def created(self, spec: InstanceSpec) -> None:
        """An instance was created: take up its policy (a recreated one starts whole)."""
        if spec.scaling is None or spec.id in self.groups:
            return
        self.groups[spec.id] = Group(parent=spec.id, spec=spec.model_dump(), policy=spec.scaling)
        self._save(self.groups[spec.id])

    def started(self, instance_id: str) -> None:
        """The instance runs: its manager runs too."""
        if instance_id in self.groups and instance_id not in self._loops:
            task = asyncio.create_task(self._run(instance_id), name=f"scaling-{instance_id}")
            self._loops[instance_id] = task

    async def quiesce(self, parent_id: str, reason: str = "the instance stops") -> None:
        """Stop the manager, fold every sibling back, close the endpoint."""
        group = self.groups.get(parent_id)
        if group is None:
            return
        await self._stop_loop(parent_id)
        async with self._lock(parent_id):
            for child_id in list(group.children):
                await self._fold(group, child_id, reason)
            balancer = self._balancers.pop(parent_id, None)
            if balancer is not None:
                await balancer.close()

    async def remove(self, parent_id: str) -> None:
        """The parent is being destroyed: its siblings go first, then its state."""
        if parent_id not in self.groups:
            return
        await self.quiesce(parent_id, "the instance is removed")
        self.groups.pop(parent_id, None)
        self._forget(parent_id)

    async def fold_child(self, child_id: str, reason: str) -> None:
        parent_id = self.parent_of(child_id)
        if parent_id is None:
            return
        async with self._lock(parent_id):
            group = self.groups[parent_id]
            if child_id in group.children:
                await self._fold(group, child_id, reason)

    async def set_policy(self, spec: InstanceSpec) -> None:
        """The controller changed the policy (spec.scaling; None removes it)."""
        group = self.groups.get(spec.id)
        if spec.scaling is None:
            if group is not None:
                await self.remove(spec.id)
            return
        if group is not None and group.policy == spec.scaling:
            return
        running = spec.id in self._loops
        if group is not None:
            await self._stop_loop(spec.id)
            group.policy = spec.scaling
            self._save(group)
        else:
            self.groups[spec.id] = Group(
                parent=spec.id, spec=spec.model_dump(), policy=spec.scaling
            )
            self._save(self.groups[spec.id])
            reports = {r.id: r for r in await self.agent.driver.list()}
            running = spec.id in reports and reports[spec.id].state == "running"
        if running:
            self.started(spec.id)

    def annotate(self, reports: list[InstanceReport]) -> list[InstanceReport]:
        """Reports as the controller needs them: who is whose sibling, which policy runs.

        A sibling still being carved is not reported yet, and its share is reported with
        its parent: the controller learns of the carve together with its notice.
        """
        carving = {
            child_id: group
            for group in self.groups.values()
            for child_id, child in group.children.items()
            if child["state"] == "carving"
        }
        shown = []
        for report in reports:
            if report.id in carving:
                continue
            group = self.groups.get(report.id)
            if group is not None:
                report.scaling_digest = ScalingPolicy.model_validate(group.policy).digest()
                balancer = self._balancers.get(report.id)
                report.endpoint = balancer.endpoint if balancer else None
                pending = [
                    Resources(**group.children[c]["resources"])
                    for c, g in carving.items()
                    if g is group
                ]
                for share in pending:
                    report.resources = ResourceVector.of(report.resources.to_resources() + share)
            else:
                report.parent = self.parent_of(report.id)
            shown.append(report)
        return shown

    def take_notices(self) -> list[ScalingNotice]:
        notices, self.notices = self.notices, []
        return notices

    def give_back(self, notices: list[ScalingNotice]) -> None:
        """Notices a heartbeat failed to deliver go out with the next one."""
        self.notices = (notices + self.notices)[-MAX_NOTICES:]

    def status(self, parent_id: str) -> dict[str, Any]:
        group = self.groups.get(parent_id)
        if group is None:
            return {"policy": None}
        balancer = self._balancers.get(parent_id)
        return {
            "policy": group.policy,
            "size": group.full.as_dict(),
            "parent_share": group.parent_share.as_dict(),
            "siblings": [{"id": cid, **child} for cid, child in group.children.items()],
            "endpoint": balancer.endpoint if balancer else None,
            "metrics": self.last_values.get(parent_id, {}),
            "managed": parent_id in self._loops,
        }

    async def restore(self) -> None:
        """After an agent restart: settle interrupted steps, restart the managers."""
        reports = {r.id: r for r in await self.agent.driver.list()}
        for parent_id, group in list(self.groups.items()):
            if parent_id not in reports:
                log.info("scaling: %s is gone; dropping its policy state", parent_id)
                for child_id in group.children:
                    if child_id in reports:
                        await self._destroy_member(child_id)
                self.groups.pop(parent_id)
                self._forget(parent_id)
                continue
            for child_id, child in list(group.children.items()):
                if child_id not in reports or child.get("state") == "folding":
                    await self._destroy_member(child_id)
                    del group.children[child_id]
                else:
                    child["state"] = "running"
            self._save(group)
            share = group.parent_share
            if reports[parent_id].resources.to_resources() != share:
                await self._resize_parent(parent_id, share)
            if reports[parent_id].state == "running":
                self.started(parent_id)

    async def close(self) -> None:
        """The agent exits: managers and endpoints stop; instances and siblings stay."""
        for parent_id in list(self._loops):
            await self._stop_loop(parent_id)
        for balancer in self._balancers.values():
            await balancer.close()
        self._balancers.clear()

    # -- the manager loop -----------------------------------------------------------------

    async def _run(self, parent_id: str) -> None:
        group = self.groups[parent_id]
        policy = ScalingPolicy.model_validate(group.policy)
        state = TriggerState(policy)
        sampler = GroupSampler(self.window)
        try:
            async with self._lock(parent_id):
                await self._open_endpoint(group, policy)
            while True:
                await self.clock.sleep(self.sample_interval)
                async with self._lock(parent_id):
                    values = await self._sample(group, policy, sampler)
                    self.last_values[parent_id] = values
                    now = self.clock.monotonic()
                    decision = state.observe(now, values, len(group.children))
                    if decision.action == "carve":
                        await self._carve(group, policy, decision.reason, now)
                        state.acted(self.clock.monotonic())
                    elif decision.action == "fold":
                        newest = max(group.children, key=lambda c: group.children[c]["seq"])
                        await self._fold(group, newest, decision.reason)
                        state.acted(self.clock.monotonic())
        except asyncio.CancelledError:
            raise
        except Exception:  # a manager that dies must say so, and leave the instance as is
            log.exception("scaling manager of %s stopped", parent_id)
            self._loops.pop(parent_id, None)

    async def _sample(
        self, group: Group, policy: ScalingPolicy, sampler: GroupSampler
    ) -> dict[str, float]:
        members = {group.parent: group.parent_share}
        for child_id, child in group.children.items():
            members[child_id] = Resources(**child["resources"])
        stats: dict[str, dict[str, float]] = {}
        for member in members:
            with contextlib.suppress(UnknownInstance):
                stats[member] = await self.agent.driver.stats(member)
        values = sampler.observe(self.clock.monotonic(), stats, members)
        if any(t.metric == "latency" for t in policy.triggers):
            target = self._probe_target(group)
            if target is not None:
                values["latency"] = await http_probe_ms(*target, policy.probe_path)
        return values

    def _probe_target(self, group: Group) -> tuple[str, int] | None:
        balancer = self._balancers.get(group.parent)
        if balancer is not None:
            return balancer.host, balancer.port
        return None

    async def _open_endpoint(self, group: Group, policy: ScalingPolicy) -> None:
        if policy.service_port is None or group.parent in self._balancers:
            return
        reports = {r.id: r for r in await self.agent.driver.list()}
        parent = reports.get(group.parent)
        if parent is None or parent.address is None:
            log.warning("scaling: %s has no address; its service has no endpoint", group.parent)
            return
        balancer = ServiceBalancer(self.service_host, policy.listen_port or group.listen_port)
        await balancer.start()
        balancer.add(group.parent, parent.address, policy.service_port)
        for child_id in group.children:
            child = reports.get(child_id)
            if child is not None and child.address:
                balancer.add(child_id, child.address, policy.service_port)
        self._balancers[group.parent] = balancer
        if group.listen_port != balancer.port:
            group.listen_port = balancer.port
            self._save(group)
        log.info("scaling: %s serves at %s", group.parent, balancer.endpoint)

    async def _carve(
        self, group: Group, policy: ScalingPolicy, reason: str, triggered_at: float
    ) -> None:
        spec = InstanceSpec.model_validate(group.spec)
        share = group.parent_share
        try:
            kept, carved = carve(share, policy.carve_fraction, policy.min_parent.to_resources())
        except FleetvisorError as exc:
            self._notify(
                ScalingNotice(kind="refused", parent=group.parent, reason=f"{reason}: {exc}")
            )
            return
        group.seq += 1
        child_id = uuid.uuid4().hex
        name = f"{spec.name[:56]}-s{group.seq}"
        group.children[child_id] = {
            "name": name,
            "resources": carved.as_dict(),
            "state": "carving",
            "seq": group.seq,
            "carved_at": self.clock.now(),
        }
        self._save(group)  # before any change, so a crash can be settled
        try:
            await self._resize_parent(group.parent, kept)
            child_spec = spec.model_copy(
                update={
                    "id": child_id,
                    "name": name,
                    "resources": ResourceVector.of(carved),
                    "scaling": None,
                    "labels": {**spec.labels, PARENT_LABEL: group.parent},
                }
            )
            async with self.agent.lock(child_id):
                if self.agent.images is not None:
                    await self.agent.images.prepare(child_id, child_spec.image)
                await self.agent.driver.create(child_spec)
                report = await self.agent.driver.start(child_id)
        except Exception as exc:
            log.warning("scaling: carving %s failed: %s", group.parent, exc)
            await self._destroy_member(child_id)
            del group.children[child_id]
            self._save(group)
            with contextlib.suppress(Exception):
                await self._resize_parent(group.parent, share)
            self._notify(
                ScalingNotice(
                    kind="refused", parent=group.parent, reason=f"{reason}; carve failed: {exc}"
                )
            )
            return
        balancer = self._balancers.get(group.parent)
        if balancer is not None and policy.service_port and report.address:
            ready = await _wait_ready(report.address, policy.service_port, self.clock)
            balancer.add(child_id, report.address, policy.service_port)
            if not ready:
                log.warning("scaling: %s did not answer in %.0fs", name, READY_TIMEOUT)
        # Reported from now on, with the notice that says why (see annotate).
        group.children[child_id]["state"] = "running"
        self._save(group)
        log.info(
            "scaling: carved %s from %s (%s): %s", name, group.parent, carved.describe(), reason
        )
        self._notify(
            ScalingNotice(
                kind="carved",
                parent=group.parent,
                child=child_id,
                child_name=name,
                resources=ResourceVector.of(carved),
                reason=reason,
                # trigger -> the sibling answers at the endpoint (or runs, without one)
                reaction_s=self.clock.monotonic() - triggered_at,
                at=self.clock.now(),
            )
        )

    async def _fold(self, group: Group, child_id: str, reason: str) -> None:
        child = group.children[child_id]
        child["state"] = "folding"
        self._save(group)
        balancer = self._balancers.get(group.parent)
        if balancer is not None:
            await balancer.drain(child_id, DRAIN_TIMEOUT)
        await self._destroy_member(child_id)
        del group.children[child_id]
        self._save(group)
        await self._resize_parent(group.parent, group.parent_share)
        log.info("scaling: folded %s back into %s: %s", child["name"], group.parent, reason)
        self._notify(
            ScalingNotice(
                kind="folded",
                parent=group.parent,
                child=child_id,
                child_name=child["name"],
                resources=ResourceVector(**child["resources"]),
                reason=reason,
                at=self.clock.now(),
            )
        )

    # -- helpers --------------------------------------------------------------------------

    async def _resize_parent(self, parent_id: str, resources: Resources) -> None:
        async with self.agent.lock(parent_id):
            await self.agent.driver.resize(parent_id, resources)

    async def _destroy_member(self, child_id: str) -> None:
        async with self.agent.lock(child_id):
            with contextlib.suppress(UnknownInstance):
                await self.agent.driver.destroy(child_id)
            if self.agent.images is not None:
                await self.agent.images.release(child_id)

    async def _stop_loop(self, parent_id: str) -> None:
        task = self._loops.pop(parent_id, None)
        if task is None:
            return
        async with self._lock(parent_id):  # never cancel a manager in the middle of a step
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    def _lock(self, parent_id: str) -> asyncio.Lock:
        return self._locks.setdefault(parent_id, asyncio.Lock())

    def _notify(self, notice: ScalingNotice) -> None:
        self.notices = (self.notices + [notice])[-MAX_NOTICES:]
        if self.on_notice is not None:
            self.on_notice()

    def _save(self, group: Group) -> None:
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"{group.parent}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(group)))
        os.replace(tmp, path)

    def _forget(self, parent_id: str) -> None:
        self.last_values.pop(parent_id, None)
        self._locks.pop(parent_id, None)
        if self.dir is not None:
            (self.dir / f"{parent_id}.json").unlink(missing_ok=True)


async def _wait_ready(host: str, port: int, clock: Any) -> bool:
    """Until the service accepts a connection (a sibling's first requests must not fail)."""
    deadline = clock.monotonic() + READY_TIMEOUT
    while clock.monotonic() < deadline:
        try:
            _reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
        except (OSError, TimeoutError):
            await clock.sleep(0.01)
            continue
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
        return True
    return False
