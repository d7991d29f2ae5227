"""FleetSnapshot: every host as columns of numpy arrays, plus per-group member indexes.

Built once from the store's host rows (`HostCandidate`s) and group membership; then the
engine mutates it with `assign`/`unassign` as it places, so placing thousands of
instances in one batch never rebuilds anything. Per-host work in filters and scoring
models is an operation over these arrays, not a Python loop over hosts.

Hosts are sorted by name, so ties between equal scores go to the first name (as in
`first_fit`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from numpy.typing import NDArray

from fleetvisor.errors import InvalidInput
from fleetvisor.model.entities import HostState, PlacementScope
from fleetvisor.model.resources import DIMENSIONS, Resources
from fleetvisor.scheduler.config import ForecastConfig
from fleetvisor.scheduler.forecast import Smoothing, fit_holt_winters, holt_winters, window_peak
from fleetvisor.scheduler.groups import GroupMember, GroupState, PlacementGroupSpec
from fleetvisor.scheduler.snapshot import HostCandidate
from fleetvisor.scheduler.telemetry import METRIC_DIMENSION_INDEX, METRICS, neighbour_pressure

Ints = NDArray[np.int64]
Floats = NDArray[np.float64]
Mask = NDArray[np.bool_]
Hosts = slice | Ints  # every host (slice(None)) or some, by index
ALL: slice = slice(None)
N_DIMS = len(DIMENSIONS)


_METRIC_ROWS = np.array(METRIC_DIMENSION_INDEX)


def vector(resources: Resources) -> Ints:
    return np.array(resources.as_tuple(), dtype=np.int64)


@dataclass(slots=True)
class Vocabulary:
    """Strings to small integer codes, so equality filters compare integer arrays."""

    names: list[str] = field(default_factory=list)
    codes: dict[str, int] = field(default_factory=dict)

    def code(self, name: str) -> int:
        if name not in self.codes:
            self.codes[name] = len(self.names)
            self.names.append(name)
        return self.codes[name]


class FleetSnapshot:
    """Columns over hosts (index = position in `hosts`) and the groups' member indexes."""

    def __init__(
        self,
        hosts: Sequence[HostCandidate],
        groups: Mapping[str, PlacementGroupSpec] | Iterable[PlacementGroupSpec] = (),
        members: Iterable[GroupMember] = (),
        forecast: ForecastConfig | None = None,
    ) -> None:
        self.hosts: list[HostCandidate] = sorted(hosts, key=lambda h: h.name)
        n = len(self.hosts)
        self.index_of: dict[str, int] = {h.id: i for i, h in enumerate(self.hosts)}
        self.capacity: Ints = np.zeros((N_DIMS, n), dtype=np.int64)
        self.allocated: Ints = np.zeros((N_DIMS, n), dtype=np.int64)
        self.states = Vocabulary()
        self.drivers = Vocabulary()
        self.clusters = Vocabulary()
        self.sites = Vocabulary()
        self.state_code = np.zeros(n, dtype=np.int16)
        self.driver_code = np.zeros(n, dtype=np.int16)
        self.cluster_of = np.zeros(n, dtype=np.int64)
        self.site_of = np.zeros(n, dtype=np.int64)
        labels: dict[tuple[str, str], list[int]] = defaultdict(list)
        traits: dict[str, list[int]] = defaultdict(list)
        layers: dict[str, list[int]] = defaultdict(list)
        site_of_cluster: dict[int, int] = {}
        for i, host in enumerate(self.hosts):
            self.capacity[:, i] = host.capacity.as_tuple()
            self.allocated[:, i] = host.allocated.as_tuple()
            self.state_code[i] = self.states.code(host.state)
            self.driver_code[i] = self.drivers.code(host.driver)
            site = self.sites.code(host.site)
            cluster = self.clusters.code(host.cluster)
            if site_of_cluster.setdefault(cluster, site) != site:
                raise InvalidInput(f"cluster {host.cluster!r} appears in two sites")
            self.cluster_of[i] = cluster
            self.site_of[i] = site
            for item in host.labels.items():
                labels[item].append(i)
            for trait in host.traits:
                traits[trait].append(i)
            for digest in host.cached_layers:
                layers[digest].append(i)
        self.ready_code = self.states.code(HostState.READY)
        self.trusted: Mask = np.array([h.attestation == "trusted" for h in self.hosts], dtype=bool)
        self.untrusted: Mask = np.array(
            [h.attestation == "untrusted" for h in self.hosts], dtype=bool
        )
        self.free: Ints = self.capacity - self.allocated
        self.free_by_host: Ints = self.free.T.copy()  # (n, 4), its own memory: one row a host
        self.allocated_at_build: Ints = self.allocated.copy()
        self.label_index = {k: np.array(v, dtype=np.int64) for k, v in labels.items()}
        self.trait_index = {k: np.array(v, dtype=np.int64) for k, v in traits.items()}
        self.layer_index = {k: np.array(v, dtype=np.int64) for k, v in layers.items()}
        self.hosts_in_cluster = _members_of(self.cluster_of, len(self.clusters.names))
        self.hosts_in_site = _members_of(self.site_of, len(self.sites.names))
        # Static per-host figures the scoring models combine with a request.
        capacity = self.capacity.astype(np.float64)
        self.inverse_capacity: Floats = np.divide(
            1.0, capacity, out=np.zeros(capacity.shape), where=capacity > 0
        )
        self.metric_inverse_capacity: Floats = np.ascontiguousarray(
            self.inverse_capacity[list(METRIC_DIMENSION_INDEX)]
        )
        largest = capacity.max(axis=1, keepdims=True) if n else np.ones((N_DIMS, 1))
        self.capacity_share: Floats = np.divide(
            capacity, largest, out=np.zeros(capacity.shape), where=largest > 0
        ).mean(axis=0)
        self.forecast_config = forecast or ForecastConfig()
        self.forecast_peak = self._forecast(self.forecast_config)
        self.pressure = self._pressure()
        self.pressure_per_unit: Floats = self.pressure * self.metric_inverse_capacity
        self.has_history = any(h.utilization_history for h in self.hosts)
        self.has_pressure = bool(self.pressure.any())
        # Per-host figures kept current by assign/unassign (one column per change).
        self.utilization: Floats = (self.allocated * self.inverse_capacity).mean(axis=0)
        self.in_use: Floats = np.asarray(self.allocated.any(axis=0), dtype=np.float64)
        # host-major (n, 3): a placement patches one row, a rescore gathers a few rows
        self.forecast_load: Floats = self.forecast_peak.T.copy()  # its own memory
        self.changes: list[int] = []  # hosts touched by assign/unassign, in order
        self._changed_memo: dict[int, Ints] = {}
        self._inverse_by_host: Floats = self.inverse_capacity.T.copy()
        self.groups: dict[str, GroupState] = {}
        specs = groups.values() if isinstance(groups, Mapping) else groups
        for spec in specs:
            self.groups[spec.name] = GroupState(spec)
        for member in members:
            self._add_member(member)

    # -- building -----------------------------------------------------------------

    def _forecast(self, config: ForecastConfig) -> Floats:
        """Predicted peak utilization over the next window, (3 metrics, n hosts)."""
        n = len(self.hosts)
        length = max(
            (len(s) for h in self.hosts for s in h.utilization_history.values()), default=0
        )
        fallback = self._allocated_fraction()
        if length == 0 or n == 0:
            return fallback
        series = np.empty((len(METRICS) * n, length))
        for k, metric in enumerate(METRICS):
            for i, host in enumerate(self.hosts):
                row = k * n + i
                values = host.utilization_history.get(metric, ())
                if not values:
                    series[row] = fallback[k, i]
                    continue
                series[row, length - len(values) :] = values
                series[row, : length - len(values)] = values[0]  # back-fill the start
        if config.fit:
            forecast, _ = fit_holt_winters(
                series, config.horizon, config.season_length, config.damping
            )
        else:
            smoothing = Smoothing(config.alpha, config.beta, config.gamma, config.damping)
            forecast, _ = holt_winters(series, config.horizon, config.season_length, smoothing)
        return window_peak(forecast).reshape(len(METRICS), n)

    def _allocated_fraction(self) -> Floats:
        rows = np.array(METRIC_DIMENSION_INDEX)
        cap = self.capacity[rows].astype(np.float64)
        return np.divide(self.allocated[rows], cap, out=np.zeros_like(cap), where=cap > 0).astype(
            np.float64
        )

    def _pressure(self) -> Floats:
        result = np.zeros((len(METRICS), len(self.hosts)))
        for i, host in enumerate(self.hosts):
            if host.neighbours:
                result[:, i] = neighbour_pressure(host.neighbours, host.capacity)
        return result

    def _add_member(self, member: GroupMember) -> None:
        state = self.groups.get(member.group)
        if state is None:
            raise InvalidInput(f"group member of unknown placement group {member.group!r}")
        host = self.index_of.get(member.host_id, -1)
        if host >= 0:
            state.add(host, int(self.cluster_of[host]), int(self.site_of[host]))
            return
        cluster = self.clusters.codes.get(member.cluster, -1)
        site = self.sites.codes.get(member.site, -1)
        state.add(-1, cluster, site)

    # -- domains ------------------------------------------------------------------

    def domain_of(self, scope: PlacementScope, host: int) -> int:
        if scope == PlacementScope.HOST:
            return host
        if scope == PlacementScope.CLUSTER:
            return int(self.cluster_of[host])
        return int(self.site_of[host])

    def domains(self, scope: PlacementScope) -> Ints:
        """The domain index of every host at `scope`."""
        if scope == PlacementScope.HOST:
            return np.arange(len(self.hosts), dtype=np.int64)
        return self.cluster_of if scope == PlacementScope.CLUSTER else self.site_of

    def domain_count(self, scope: PlacementScope) -> int:
        if scope == PlacementScope.HOST:
            return len(self.hosts)
        names = self.clusters.names if scope == PlacementScope.CLUSTER else self.sites.names
        return len(names)

    def hosts_in(self, scope: PlacementScope, domain: int) -> Ints:
        if scope == PlacementScope.HOST:
            return np.array([domain], dtype=np.int64)
        if scope == PlacementScope.CLUSTER:
            return self.hosts_in_cluster[domain]
        return self.hosts_in_site[domain]

    def hosts_in_domains(self, scope: PlacementScope, domains: Iterable[int]) -> Ints:
        if scope == PlacementScope.HOST:
            return np.fromiter((d for d in domains if d >= 0), dtype=np.int64)
        chosen = [self.hosts_in(scope, d) for d in domains if d >= 0]
        if not chosen:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate(chosen)

    def domain_name(self, scope: PlacementScope, domain: int) -> str:
        if scope == PlacementScope.HOST:
            return self.hosts[domain].name
        names = self.clusters.names if scope == PlacementScope.CLUSTER else self.sites.names
        return names[domain] or f"(unnamed {scope})"

    def members_near(self, group: GroupState) -> Ints:
        """Members of `group` in each host's domain (at the group's scope), for every host."""
        scope = group.spec.scope
        per_domain = np.zeros(self.domain_count(scope), dtype=np.int64)
        for domain, count in group.in_scope().items():
            if domain >= 0:
                per_domain[domain] = count
        if scope == PlacementScope.HOST:
            return per_domain
        return per_domain[self.domains(scope)]

    # -- mutation -----------------------------------------------------------------

    def assign(self, host: int, need: Ints, groups: Iterable[str]) -> None:
        """Account one placed instance: its resources and its groups' member counts."""
        self._move(host, need, 1)
        cluster, site = int(self.cluster_of[host]), int(self.site_of[host])
        for name in groups:
            self.groups[name].add(host, cluster, site)

    def unassign(self, host: int, need: Ints, groups: Iterable[str]) -> None:
        """Undo `assign` (a rolled-back batch member, or an instance that moves away)."""
        self._move(host, need, -1)
        cluster, site = int(self.cluster_of[host]), int(self.site_of[host])
        for name in groups:
            self.groups[name].add(host, cluster, site, delta=-1)

    def _move(self, host: int, need: Ints, sign: int) -> None:
        """Allocation ± need on one host, and the derived per-host figures with it."""
        allocated = self.allocated[:, host]
        if sign > 0:
            allocated += need
            self.free[:, host] -= need
            self.free_by_host[host] -= need
        else:
            allocated -= need
            self.free[:, host] += need
            self.free_by_host[host] += need
        inverse = self._inverse_by_host[host]
        share = need * inverse
        self.utilization[host] += sign * float(share.sum()) / N_DIMS
        self.in_use[host] = 1.0 if allocated.any() else 0.0
        self.forecast_load[host] += sign * share.take(_METRIC_ROWS)
        self.changes.append(host)
        self._changed_memo.clear()

    def set_generation(self, host_id: str, generation: int) -> None:
        """The store's generation of a host after the controller bound a reservation on it,
        so a long-lived snapshot's next decision on that host reserves against it."""
        index = self.index_of[host_id]
        self.hosts[index] = replace(self.hosts[index], generation=generation)

    def copy(self) -> FleetSnapshot:
        """An independent working copy (arrays and member counts; static data shared)."""
        clone = object.__new__(FleetSnapshot)
        for name, value in vars(self).items():
            setattr(clone, name, value)
        clone.hosts = list(self.hosts)
        clone.allocated = self.allocated.copy()
        clone.free = self.free.copy()
        clone.free_by_host = self.free_by_host.copy()
        clone.utilization = self.utilization.copy()
        clone.in_use = self.in_use.copy()
        clone.forecast_load = self.forecast_load.copy()
        clone.changes = list(self.changes)
        clone._changed_memo = {}
        clone.groups = {name: state.copy() for name, state in self.groups.items()}
        return clone

    @property
    def version(self) -> int:
        """Counts allocation changes: derived per-host figures are current as of it."""
        return len(self.changes)

    def changed_since(self, version: int) -> Ints:
        """Hosts whose allocation changed after `version` (a host may appear twice)."""
        found = self._changed_memo.get(version)
        if found is None:
            changed = np.array(self.changes[version:], dtype=np.int64)
            # duplicates only repeat work; removing them pays off on long lists
            found = np.unique(changed) if changed.size > 512 else changed
            self._changed_memo[version] = found
        return found

    # -- queries ------------------------------------------------------------------

    def ready(self) -> Mask:
        return np.asarray(self.state_code == self.ready_code)

    def used(self) -> Mask:
        """Hosts that hold any allocation."""
        return np.asarray(self.allocated.any(axis=0))

    def dominant_share(self, need: Resources) -> float:
        """need's largest fraction of an average host: the size that orders "decreasing"."""
        if not len(self):
            return 0.0
        mean = self.capacity.mean(axis=1)
        wanted = np.array(need.as_tuple(), dtype=np.float64)
        return float(np.max(np.divide(wanted, mean, out=np.zeros(N_DIMS), where=mean > 0)))

    def oversubscribed(self) -> Ints:
        return np.flatnonzero((self.free < 0).any(axis=0))

    def __len__(self) -> int:
        return len(self.hosts)


def _members_of(domain_of: Ints, count: int) -> list[Ints]:
    order = np.argsort(domain_of, kind="stable")
    bounds = np.searchsorted(domain_of[order], np.arange(count + 1))
    return [order[bounds[d] : bounds[d + 1]].astype(np.int64) for d in range(count)]
