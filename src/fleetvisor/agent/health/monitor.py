"""HealthSupervisor: execution monitoring of the instances of one host.

    watch(spec) ──► one monitor per instance (never for scaling siblings)
      sample loop, every sample_interval:
        HostView: one driver.list() per tick for the whole host (shared by the monitors)
          ──► Sample(state, counters, neighbours) ──► detectors ──► detections
      probe loops, one per probe, every probe.interval_s once initial_delay_s passed:
        exec | http | tcp ──► ProbeStatus (thresholds) ──► probe_failed (liveness)
      detections ──► remedy = policy.remedy(issue)
        restart ─► in place: stop + start through the agent's callables (its per-instance
                   lock), at most max_restarts per restart_window_s; past that one
                   restart_loop detection and no more in-place restarts
        migrate | alert ─► left to the controller
      every detection ──► queue ──► drain() by the heartbeat (requeue() if it failed);
                          on_detection() asks for a heartbeat now

The agent tells the monitor what it asked for: `expect_stopped` before it stops an
instance, `expect_running` after it started one. A sample taken before the latest
change of intent is not used to judge an exit, so a stop the agent asked for is never
mistaken for a crash. A stop or start the monitor itself makes for a restart is told
apart from the agent's own by a context variable, so an operator's stop that comes
during a restart wins: the instance is not started again.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fleetvisor.agent.health.detectors import (
    Detector,
    Neighbour,
    ProbeFailedDetector,
    Sample,
    default_detectors,
)
from fleetvisor.agent.health.probes import ProbeStatus, describe, run_probe
from fleetvisor.clock import Clock
from fleetvisor.drivers.base import Driver
from fleetvisor.model.health import Detection, HealthPolicy, Issue, Remedy
from fleetvisor.model.scaling import PARENT_LABEL
from fleetvisor.model.specs import InstanceReport, InstanceSpec

log = logging.getLogger("fleetvisor.agent.health")

MAX_DETECTIONS = 1000  # queued for the controller; the oldest go first
Action = Callable[[str], Awaitable[Any]]

# Set while a monitor stops and starts its instance: the agent's expect_* calls made
# inside that restart are the monitor's own, not an operator's.
_restarting: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "fleetvisor_health_restarting", default=None
)


@dataclass
class Snapshot:
    """One driver.list() of the host."""

    reports: dict[str, InstanceReport]
    taken_at: float  # monotonic
    intent_seq: int  # the supervisor's intent counter when the listing began


class HostView:
    """driver.list() shared by every monitor: at most one listing per `max_age` seconds."""

    def __init__(self, driver: Driver, clock: Clock, max_age: float) -> None:
        self.driver = driver
        self.clock = clock
        self.max_age = max_age
        self.latest: Snapshot | None = None
        self._lock = asyncio.Lock()  # who comes while a listing runs takes its result

    async def get(self, intent_seq: Callable[[], int]) -> Snapshot:
        async with self._lock:
            latest = self.latest
            if latest is not None and self.clock.monotonic() - latest.taken_at < self.max_age:
                return latest
            seq = intent_seq()
            reports = await self.driver.list()
            self.latest = Snapshot({r.id: r for r in reports}, self.clock.monotonic(), seq)
            return self.latest

    def forget(self) -> None:
        self.latest = None


@dataclass
class Monitor:
    """One watched instance: its policy, what the agent wants of it, its detectors."""

    spec: InstanceSpec
    policy: HealthPolicy
    detectors: list[Detector]
    probes: list[ProbeStatus]
    expect_running: bool = False
    intent_seq: int = 0  # the supervisor's counter at the latest change of intent
    run_epoch: int = 0  # +1 at every (re)start: probe and sample results of before are void
    running_since: float | None = None  # monotonic, when it was (re)started
    state: str = "unknown"  # as last sampled
    sampled_at: float | None = None  # the listing last fed to the detectors (monotonic)
    address: str | None = None
    restarts: deque[float] = field(default_factory=deque)  # monotonic times, in the window
    restart_loop: bool = False  # declared: no more in-place restarts until a fresh start
    restarting: bool = False
    interrupted: bool = False  # the agent asked for a stop/start during our restart
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one detect-and-act at a time
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    last_detection: dict[str, float] = field(default_factory=dict)  # issue -> wall time


class HealthSupervisor:
    """Watches instances, runs their probes and detectors, restarts in place, and queues
    every detection for the controller. See the module docstring for the flow."""

    def __init__(
        self,
        driver: Driver,
        clock: Clock,
        *,
        stop: Action,
        start: Action,
        sample_interval: float = 0.5,
        rate_window: float = 1.0,
        on_detection: Callable[[], None] | None = None,
    ) -> None:
        """`stop` / `start` stop and start an instance the way the agent does (its lock,
        its bookkeeping); they are called for in-place restarts only. Rates (throttled
        share, run-queue wait) are taken over `rate_window` seconds."""
        self.driver = driver
        self.clock = clock
        self._stop = stop
        self._start = start
        self.sample_interval = sample_interval
        self.rate_window = max(rate_window, sample_interval)
        self.on_detection = on_detection  # e.g. send a heartbeat now
        self.view = HostView(driver, clock, max_age=sample_interval / 2)
        self.monitors: dict[str, Monitor] = {}
        self._queue: list[Detection] = []
        self._intent_seq = 0
        self._capacity_millicores: float | None = None
        self._probe_detector = ProbeFailedDetector()
        self._closed = False

    # -- what the agent calls -------------------------------------------------------------

    def watch(self, spec: InstanceSpec, running: bool = False) -> None:
        """Monitor the instance with `spec.health` (None: default detectors, no probes).

        A new instance is expected stopped until `expect_running` (call that after
        starting it: its counters start from zero). `running=True` is for an instance
        already running when the watch begins (after an agent restart): it is expected
        to run, and its counters as first read are the baseline (kills and waits from
        before are not reported). Watching a watched instance again applies a changed
        policy and keeps what the agent expects of it. Scaling siblings (label
        fleetvisor.io/parent) are left to their parent's manager.
        """
        if self._closed or PARENT_LABEL in spec.labels:
            return
        policy = HealthPolicy.model_validate(spec.health or {})
        current = self.monitors.get(spec.id)
        if current is not None and current.policy == policy:
            current.spec = spec
            return
        monitor = Monitor(
            spec=spec,
            policy=policy,
            detectors=default_detectors(policy.detectors, self.rate_window),
            probes=[ProbeStatus(probe) for probe in policy.probes],
        )
        if current is not None:
            self._cancel(current)
            monitor.expect_running = current.expect_running
            monitor.intent_seq = current.intent_seq
            monitor.running_since = current.running_since
            monitor.restarts = current.restarts
            monitor.restart_loop = current.restart_loop
        elif running:
            monitor.expect_running = True
            monitor.running_since = self.clock.monotonic()
        self.monitors[spec.id] = monitor
        self._launch(monitor)

    async def unwatch(self, instance_id: str) -> None:
        """Stop monitoring (the instance is being destroyed or leaves this host). Does not
        wait for a restart in progress: it is cancelled, the destroy that follows cleans up."""
        monitor = self.monitors.pop(instance_id, None)
        if monitor is not None:
            await self._stop_tasks(monitor)

    def expect_stopped(self, instance_id: str) -> None:
        """The agent is about to stop the instance: a stop from now on is no exit."""
        self._intent(instance_id, running=False)

    def expect_running(self, instance_id: str) -> None:
        """The agent started the instance: from now on it should run."""
        self._intent(instance_id, running=True)

    def drain(self) -> list[Detection]:
        """Detections for the next heartbeat, oldest first (the queue is emptied)."""
        detections, self._queue = self._queue, []
        return detections

    def requeue(self, detections: list[Detection]) -> None:
        """Detections a heartbeat failed to deliver go out with the next one."""
        self._queue = (detections + self._queue)[-MAX_DETECTIONS:]

    def status(self, instance_id: str) -> dict[str, Any]:
        """What the monitor knows of an instance now (for the agent's API and debugging)."""
        monitor = self.monitors.get(instance_id)
        if monitor is None:
            return {"watched": False}
        self._prune_restarts(monitor)
        measured: dict[str, float | None] = {}
        for detector in monitor.detectors:
            for name in ("share", "ratio", "rate"):
                if hasattr(detector, name):
                    measured[f"{detector.issue}"] = getattr(detector, name)
        return {
            "watched": True,
            "policy_digest": monitor.policy.digest(),
            "expect_running": monitor.expect_running,
            "state": monitor.state,
            "restarts_in_window": len(monitor.restarts),
            "restart_loop": monitor.restart_loop,
            "measured": measured,
            "probes": [
                {
                    "target": describe(p.probe, monitor.address),
                    "role": p.probe.role,
                    "status": p.status,
                    "failures": p.failures,
                    "last_error": p.last_message,
                }
                for p in monitor.probes
            ],
            "last_detection": dict(monitor.last_detection),
        }

    async def close(self) -> None:
        """The agent exits: monitors stop (a restart in progress finishes first)."""
        self._closed = True
        for monitor in list(self.monitors.values()):
            async with monitor.lock:
                self._cancel(monitor)
            await self._stop_tasks(monitor)
        self.monitors.clear()

    # -- intent ----------------------------------------------------------------------------

    def _intent(self, instance_id: str, running: bool) -> None:
        monitor = self.monitors.get(instance_id)
        if monitor is None:
            return
        self._intent_seq += 1
        monitor.intent_seq = self._intent_seq
        if _restarting.get() == instance_id:  # our own restart's stop/start: it sets intent
            return
        if monitor.restarting:
            monitor.interrupted = True
        monitor.expect_running = running
        if running:
            monitor.restart_loop = False  # a fresh start by the agent: in-place restarts again
            self._fresh_run(monitor)

    def _fresh_run(self, monitor: Monitor) -> None:
        """The instance was (re)started: a new process, counters from zero."""
        monitor.run_epoch += 1
        monitor.running_since = self.clock.monotonic()
        for detector in monitor.detectors:
            detector.reset(fresh=True)
        for probe in monitor.probes:
            probe.reset()

    # -- loops -----------------------------------------------------------------------------

    def _launch(self, monitor: Monitor) -> None:
        instance = monitor.spec.id
        monitor.tasks.append(
            asyncio.create_task(self._sample_loop(monitor), name=f"health-{instance}")
        )
        for index in range(len(monitor.probes)):
            monitor.tasks.append(
                asyncio.create_task(
                    self._probe_loop(monitor, index), name=f"health-{instance}-probe{index}"
                )
            )

    def _cancel(self, monitor: Monitor) -> None:
        for task in monitor.tasks:
            task.cancel()

    async def _stop_tasks(self, monitor: Monitor) -> None:
        tasks, monitor.tasks = monitor.tasks, []
        current = asyncio.current_task()
        for task in tasks:
            task.cancel()
        for task in tasks:
            if task is not current:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _sample_loop(self, monitor: Monitor) -> None:
        while True:
            try:
                await self._sample_once(monitor)
            except asyncio.CancelledError:
                raise
            except Exception:  # one bad tick (a driver error) must not end the watch
                log.exception("health: sampling %s failed", monitor.spec.id)
            await self.clock.sleep(self.sample_interval)

    async def _sample_once(self, monitor: Monitor) -> None:
        snapshot = await self.view.get(lambda: self._intent_seq)
        report = snapshot.reports.get(monitor.spec.id)
        if report is None:
            monitor.state = "unknown"
            return
        async with monitor.lock:
            if monitor.restarting or snapshot.intent_seq < monitor.intent_seq:
                return  # listed before the latest stop/start: not evidence of anything now
            if monitor.sampled_at is not None and snapshot.taken_at <= monitor.sampled_at:
                return  # this listing was seen already
            monitor.sampled_at = snapshot.taken_at
            monitor.state = report.state
            monitor.address = report.address or monitor.address
            sample = self._sample(monitor, report, snapshot)
            found = [d for d in (det.observe(sample) for det in monitor.detectors) if d]
            if found:
                await self._handle(monitor, found)

    def _sample(self, monitor: Monitor, report: InstanceReport, snapshot: Snapshot) -> Sample:
        neighbours = tuple(
            Neighbour(r.id, r.name, float(r.usage.get("cpu_millicores", 0.0)))
            for r in snapshot.reports.values()
            if r.id != report.id and r.state == "running"
        )
        # Rates are taken between listings: the time is the listing's, not this tick's
        # (a monitor may read a listing another one made a moment ago).
        age = self.clock.monotonic() - snapshot.taken_at
        return Sample(
            instance=report.id,
            at=snapshot.taken_at,
            wall=self.clock.now() - age,
            state=report.state,
            usage=report.usage,
            expect_running=monitor.expect_running,
            memory_allocated_mib=float(monitor.spec.resources.memory),
            neighbours=neighbours,
            host_capacity_millicores=self._capacity(),
        )

    def _capacity(self) -> float:
        if self._capacity_millicores is None:
            try:
                self._capacity_millicores = float(self.driver.host_info().capacity.vcpus)
            except Exception:
                self._capacity_millicores = 0.0
        return self._capacity_millicores

    async def _probe_loop(self, monitor: Monitor, index: int) -> None:
        status = monitor.probes[index]
        probe = status.probe
        instance = monitor.spec.id
        cannot_run_logged = False
        while True:
            waiting = self._probe_wait(monitor, probe.initial_delay_s)
            if waiting is not None:
                await self.clock.sleep(waiting)
                continue
            epoch = monitor.run_epoch
            try:
                result = await run_probe(probe, instance, monitor.address, self.driver)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("health: probe %s of %s failed to run", index, instance)
                result = None
            if result is None:
                if not cannot_run_logged:
                    log.warning(
                        "health: cannot run %s on %s here (%s)",
                        describe(probe, monitor.address),
                        instance,
                        "the driver has no exec" if probe.kind == "exec" else "no address",
                    )
                    cannot_run_logged = True
            else:
                async with monitor.lock:
                    if epoch == monitor.run_epoch and not monitor.restarting:
                        changed = status.record(result)
                        if changed == "failed":
                            detection = self._probe_detector.observe_probe(
                                instance,
                                probe,
                                describe(probe, monitor.address),
                                status.failures,
                                status.last_message,
                                self.clock.monotonic(),
                                self.clock.now(),
                            )
                            if detection is not None:
                                await self._handle(monitor, [detection])
                        elif changed == "ok" and probe.role == "liveness":
                            log.info("health: %s of %s passes again", probe.kind, instance)
            await self.clock.sleep(probe.interval_s)

    def _probe_wait(self, monitor: Monitor, initial_delay: float) -> float | None:
        """How long to wait before the next probe may run; None: run it now."""
        if (
            not monitor.expect_running
            or monitor.restarting
            or monitor.running_since is None
            or monitor.state != "running"
        ):
            return self.sample_interval
        due = monitor.running_since + initial_delay - self.clock.monotonic()
        return due if due > 0 else None

    # -- remedies --------------------------------------------------------------------------

    async def _handle(self, monitor: Monitor, detections: list[Detection]) -> None:
        """Act on detections (the monitor's lock is held) and queue them all."""
        policy = monitor.policy
        restart_for = [d for d in detections if policy.remedy(d.issue) == Remedy.RESTART]
        if restart_for and monitor.expect_running and not monitor.restart_loop:
            self._prune_restarts(monitor)
            if len(monitor.restarts) < policy.max_restarts:
                monitor.restarts.append(self.clock.monotonic())
                error = await self._restart(monitor, restart_for)
                for detection in restart_for:
                    if error is None:
                        detection.action = "restart"
                    else:
                        detection.message = f"{detection.message}; not restarted: {error}"[:1000]
            else:
                monitor.restart_loop = True
                detections.append(self._restart_loop(monitor, restart_for))
        for detection in detections:
            self._enqueue(monitor, detection)
        if self.on_detection is not None:
            try:
                self.on_detection()
            except Exception:
                log.exception("health: on_detection failed")

    async def _restart(self, monitor: Monitor, why: list[Detection]) -> str | None:
        """Stop and start the instance through the agent's callables; the error, if any."""
        instance = monitor.spec.id
        reasons = ", ".join(sorted({str(d.issue) for d in why}))
        log.warning("health: restarting %s in place (%s)", instance, reasons)
        monitor.restarting = True
        monitor.interrupted = False
        token = _restarting.set(instance)
        try:
            await self._stop(instance)
            if monitor.interrupted:  # the agent stopped or started it meanwhile: its call
                return "the agent stopped or started it during the restart"
            await self._start(instance)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("health: restarting %s failed: %s", instance, exc)
            return f"the restart failed: {exc}"[:500]
        finally:
            _restarting.reset(token)
            monitor.restarting = False
            self._intent_seq += 1
            monitor.intent_seq = self._intent_seq  # listings from before are stale now
            self.view.forget()
            if not monitor.interrupted:
                # Started again, or failed to: conditions start over either way, so a
                # failed restart is detected (and tried, and counted) again.
                self._fresh_run(monitor)
        monitor.expect_running = True
        return None

    def _restart_loop(self, monitor: Monitor, why: list[Detection]) -> Detection:
        policy = monitor.policy
        issues = ", ".join(sorted({str(d.issue) for d in why}))
        return Detection(
            issue=Issue.RESTART_LOOP,
            instance=monitor.spec.id,
            at=self.clock.now(),
            since=self.clock.now() - (self.clock.monotonic() - monitor.restarts[0])
            if monitor.restarts
            else None,
            message=(
                f"{issues} again after {len(monitor.restarts)} in-place restart(s) in "
                f"{policy.restart_window_s:g} s (at most {policy.max_restarts}); "
                "no more restarts here, the fleet decides"
            ),
            evidence={
                "restarts": float(len(monitor.restarts)),
                "max_restarts": float(policy.max_restarts),
                "restart_window_s": policy.restart_window_s,
                "issue": issues,
            },
        )

    def _prune_restarts(self, monitor: Monitor) -> None:
        horizon = self.clock.monotonic() - monitor.policy.restart_window_s
        while monitor.restarts and monitor.restarts[0] <= horizon:
            monitor.restarts.popleft()

    def _enqueue(self, monitor: Monitor, detection: Detection) -> None:
        log.warning(
            "health: %s %s%s: %s",
            detection.instance,
            detection.issue,
            f" ({detection.action})" if detection.action else "",
            detection.message,
        )
        monitor.last_detection[str(detection.issue)] = detection.at
        self._queue = (self._queue + [detection])[-MAX_DETECTIONS:]
