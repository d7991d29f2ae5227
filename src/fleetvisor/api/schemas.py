"""Request and response bodies of the controller API, and row -> body conversions."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field, StringConstraints

from fleetvisor.model.health import Detection, HealthPolicy
from fleetvisor.model.scaling import ScalingNotice, ScalingPolicy
from fleetvisor.model.specs import (
    CacheReport,
    Finite,
    HostInfo,
    InstanceReport,
    InstanceSpec,
    ResourceVector,
    SafeStr,
    no_nul,
)
from fleetvisor.store.tables import (
    ClusterRow,
    EventRow,
    HostRow,
    InstanceRow,
    OperationRow,
    PlacementGroupRow,
    SiteRow,
)

Name = Annotated[SafeStr, StringConstraints(min_length=1, max_length=63)]
Text255 = Annotated[SafeStr, StringConstraints(max_length=255)]
ShortText = Annotated[SafeStr, StringConstraints(max_length=4096)]
StringMap = Annotated[
    dict[Annotated[SafeStr, StringConstraints(max_length=253)], ShortText], Field(max_length=256)
]


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str
    title: str
    status: int
    detail: str


class SiteIn(BaseModel):
    name: Name


class SiteOut(BaseModel):
    id: str
    name: str
    clusters: int
    created_at: float


class ClusterIn(BaseModel):
    name: Name
    site: Name = "default"


class ClusterOut(BaseModel):
    id: str
    name: str
    site: str
    hosts: int
    created_at: float


class HostOut(BaseModel):
    id: str
    name: str
    cluster: str | None = None
    state: str
    driver: str
    capabilities: list[str]
    cpu_model: str
    cpu_features: list[str]
    labels: dict[str, str]
    capacity: ResourceVector
    allocated: ResourceVector
    free: ResourceVector
    agent_url: str
    last_heartbeat: float
    registered_at: float
    metrics: dict[str, Any]
    cache: dict[str, Any] = {}
    instances: int = 0
    attestation_state: str = "unknown"  # trusted | untrusted | unknown
    attestation: dict[str, Any] = {}  # the last verdict: reason, message, findings, summary


class HostRegisterIn(BaseModel):
    name: Name
    cluster: Name = "default"
    # Constraints before the NUL check: after it, pydantic leaves the pattern out of OpenAPI.
    agent_url: Annotated[
        str,
        StringConstraints(pattern=r"^https?://[^\s/]+(/.*)?$", max_length=255),
        AfterValidator(no_nul),
    ]
    agent_token: Annotated[SafeStr, StringConstraints(min_length=16, max_length=128)]
    info: HostInfo
    labels: StringMap = {}
    instances: Annotated[list[InstanceReport], Field(max_length=10_000)] = []
    ready: bool = Field(
        True,
        description="false: the host prepares (e.g. fills its image "
        "cache) and reports ready in a later heartbeat",
    )
    cache: CacheReport | None = None


class HostRegisterOut(BaseModel):
    host: HostOut
    token: str
    heartbeat_interval: float
    destroy: list[str]


class HeartbeatIn(BaseModel):
    metrics: Annotated[
        dict[Annotated[SafeStr, StringConstraints(max_length=64)], Finite], Field(max_length=256)
    ] = {}
    instances: Annotated[list[InstanceReport], Field(max_length=10_000)] = []
    ready: bool | None = None
    cache: CacheReport | None = None
    scaling_events: Annotated[list[ScalingNotice], Field(max_length=1000)] = []
    detections: Annotated[list[Detection], Field(max_length=1000)] = []


class HeartbeatOut(BaseModel):
    heartbeat_interval: float
    destroy: list[str]
    scaling: list[InstanceSpec] = Field(
        default_factory=list, description="instances whose scaling policy the host must apply"
    )


class MigrateIn(BaseModel):
    to: Name | None = Field(None, description="the target host (default: the engine picks)")
    mode: Literal["auto", "live", "cold"] = Field(
        "auto", description="live: checkpoint/restore; cold: stop, move files, start"
    )


class HostStateIn(BaseModel):
    state: Annotated[str, StringConstraints(pattern=r"^(ready|draining)$")]


class InstanceIn(BaseModel):
    name: Name
    image: Annotated[Text255, StringConstraints(min_length=1)]
    resources: ResourceVector
    command: Annotated[list[ShortText], Field(max_length=256)] = []
    env: StringMap = {}
    labels: StringMap = {}
    driver: Annotated[SafeStr, StringConstraints(max_length=16)] | None = None
    placement_group: Name | None = None
    start: bool = True
    required_labels: StringMap = Field(
        default_factory=dict, description="host labels the instance needs (key=value)"
    )
    secure: bool = Field(False, description="a secure instance: requires a trusted host")
    trusted_host: bool | None = Field(
        None, description="only hosts whose attestation is trusted [default: secure]"
    )
    scaling: ScalingPolicy | None = Field(
        None, description="local scaling: when the host carves siblings out of it"
    )
    health: HealthPolicy | None = Field(
        None, description="execution monitoring: probes, detector thresholds, remedies"
    )


class InstanceOut(BaseModel):
    id: str
    name: str
    image: str
    driver: str | None
    command: list[str]
    env: dict[str, str]
    labels: dict[str, str]
    resources: ResourceVector
    placement_group: str | None = None
    host: str | None = None
    address: str | None = None
    usage: dict[str, float] = {}
    desired_power: str
    status: str
    status_message: str
    created_at: float
    updated_at: float
    trusted_host: bool = False
    parent: str | None = Field(None, description="the instance a sibling was carved from")
    scaling: dict[str, Any] | None = Field(None, description="the local scaling policy")
    endpoint: str | None = Field(None, description="the service endpoint of a scaled group")


class OperationOut(BaseModel):
    id: str
    kind: str
    state: str
    instance: str
    step: str
    attempts: int
    error: str
    created_at: float
    updated_at: float
    deadline: float
    # What a finished migration measured: mode, downtime_ms, package_bytes, dump_s.
    result: dict[str, Any] | None = None


class InstanceAccepted(BaseModel):
    instance: InstanceOut
    operation: OperationOut


class InstanceBatchIn(BaseModel):
    instances: Annotated[list[InstanceIn], Field(min_length=1, max_length=1000)]


class InstanceBatchAccepted(BaseModel):
    accepted: list[InstanceAccepted]


class GroupIn(BaseModel):
    name: Name
    policy: Annotated[str, StringConstraints(pattern=r"^(affinity|anti-affinity)$")]
    strength: Annotated[str, StringConstraints(pattern=r"^(hard|soft)$")] = "hard"
    scope: Annotated[str, StringConstraints(pattern=r"^(host|cluster|site)$")] = "host"
    max_per_scope: Annotated[int, Field(ge=1, le=1_000_000)] | None = None


class GroupOut(BaseModel):
    id: str
    name: str
    policy: str
    strength: str
    scope: str
    max_per_scope: int | None
    members: list[str] | int
    created_at: float


class EventOut(BaseModel):
    id: int
    at: float
    kind: str
    subject: str
    message: str
    data: dict[str, Any]


def site_out(row: SiteRow, clusters: int) -> SiteOut:
    return SiteOut(id=row.id, name=row.name, clusters=clusters, created_at=row.created_at)


def cluster_out(row: ClusterRow, site: str, hosts: int) -> ClusterOut:
    return ClusterOut(id=row.id, name=row.name, site=site, hosts=hosts, created_at=row.created_at)


def host_out(row: HostRow, cluster: str | None = None, instances: int = 0) -> HostOut:
    return HostOut(
        id=row.id,
        name=row.name,
        cluster=cluster,
        state=row.state,
        driver=row.driver,
        capabilities=row.capabilities,
        cpu_model=row.cpu_model,
        cpu_features=row.cpu_features,
        labels=row.labels,
        capacity=ResourceVector.of(row.capacity),
        allocated=ResourceVector.of(row.allocated),
        free=ResourceVector(
            **{k: max(v, 0) for k, v in (row.capacity - row.allocated).as_dict().items()}
        ),
        agent_url=row.agent_url,
        last_heartbeat=row.last_heartbeat,
        registered_at=row.registered_at,
        metrics=row.metrics,
        cache=row.cache or {},
        instances=instances,
        attestation_state=row.attestation_state,
        attestation=row.attestation or {},
    )


def instance_out(
    row: InstanceRow, host: str | None = None, group: str | None = None, parent: str | None = None
) -> InstanceOut:
    return InstanceOut(
        parent=parent,
        scaling=row.scaling_policy,
        endpoint=row.endpoint,
        id=row.id,
        name=row.name,
        image=row.image,
        driver=row.driver,
        command=row.command,
        env=row.env,
        labels=row.labels,
        resources=ResourceVector.of(row.resources),
        placement_group=group,
        host=host,
        address=row.address,
        usage=row.usage or {},
        desired_power=row.desired_power,
        status=row.status,
        status_message=row.status_message,
        created_at=row.created_at,
        updated_at=row.updated_at,
        trusted_host=bool(row.trusted_host),
    )


def operation_out(row: OperationRow) -> OperationOut:
    return OperationOut(
        id=row.id,
        kind=row.kind,
        state=row.state,
        instance=row.instance_name,
        step=row.step,
        attempts=row.attempts,
        error=row.error,
        created_at=row.created_at,
        updated_at=row.updated_at,
        deadline=row.deadline,
        result=(row.params or {}).get("result"),
    )


def group_out(row: PlacementGroupRow, members: list[str] | int) -> GroupOut:
    return GroupOut(
        id=row.id,
        name=row.name,
        policy=row.policy,
        strength=row.strength,
        scope=row.scope,
        max_per_scope=row.max_per_scope,
        members=members,
        created_at=row.created_at,
    )


def event_out(row: EventRow) -> EventOut:
    return EventOut(
        id=row.id, at=row.at, kind=row.kind, subject=row.subject, message=row.message, data=row.data
    )
