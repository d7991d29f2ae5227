"""The schema, as SQLAlchemy 2 ORM classes. Changes go through an Alembic migration."""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Float, ForeignKey, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from fleetvisor.model.resources import Resources


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class SiteRow(Base):
    __tablename__ = "sites"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    created_at: Mapped[float] = mapped_column(Float)


class ClusterRow(Base):
    __tablename__ = "clusters"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    site_id: Mapped[str] = mapped_column(ForeignKey("sites.id"), index=True)
    created_at: Mapped[float] = mapped_column(Float)


class HostRow(Base):
    __tablename__ = "hosts"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    cluster_id: Mapped[str] = mapped_column(ForeignKey("clusters.id"), index=True)
    state: Mapped[str] = mapped_column(String(16))
    agent_url: Mapped[str] = mapped_column(String(255))
    token_hash: Mapped[str] = mapped_column(String(64))  # the agent's token, to call us
    agent_token: Mapped[str] = mapped_column(String(128))  # ours, to call the agent
    driver: Mapped[str] = mapped_column(String(16))
    capabilities: Mapped[list[Any]] = mapped_column(JSON)
    cpu_model: Mapped[str] = mapped_column(String(255))
    cpu_features: Mapped[list[Any]] = mapped_column(JSON)
    labels: Mapped[dict[str, Any]] = mapped_column(JSON)
    cap_vcpus: Mapped[int] = mapped_column(Integer)
    cap_memory: Mapped[int] = mapped_column(Integer)
    cap_disk: Mapped[int] = mapped_column(Integer)
    cap_net: Mapped[int] = mapped_column(Integer)
    alloc_vcpus: Mapped[int] = mapped_column(Integer, default=0)
    alloc_memory: Mapped[int] = mapped_column(Integer, default=0)
    alloc_disk: Mapped[int] = mapped_column(Integer, default=0)
    alloc_net: Mapped[int] = mapped_column(Integer, default=0)
    # Bumped on every change of the allocation: reservations are optimistic
    # (UPDATE ... WHERE generation = seen), so two schedulers never oversubscribe.
    generation: Mapped[int] = mapped_column(Integer, default=0)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    # The host's shared image cache as its agent last reported it: cached layers and
    # counters (hits, misses, bytes pulled, bytes saved, launch latency).
    cache: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    last_sample_at: Mapped[float] = mapped_column(Float, default=0.0)
    registered_at: Mapped[float] = mapped_column(Float)
    last_heartbeat: Mapped[float] = mapped_column(Float)
    # Remote attestation (controller/attestation.py): trusted | untrusted | unknown, the
    # last verdict (reason, findings, evidence summary), when it was reached (None: not
    # since the host last registered), and the highest release version it ever attested.
    attestation_state: Mapped[str] = mapped_column(String(16), default="unknown")
    attestation: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    attested_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    min_release_version: Mapped[int] = mapped_column(BigInteger, default=0)

    @property
    def capacity(self) -> Resources:
        return Resources(self.cap_vcpus, self.cap_memory, self.cap_disk, self.cap_net)

    @property
    def allocated(self) -> Resources:
        return Resources(self.alloc_vcpus, self.alloc_memory, self.alloc_disk, self.alloc_net)


class PlacementGroupRow(Base):
    __tablename__ = "placement_groups"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    policy: Mapped[str] = mapped_column(String(16))
    strength: Mapped[str] = mapped_column(String(8))
    scope: Mapped[str] = mapped_column(String(8))
    max_per_scope: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # Bumped by every placement into the group: concurrent placements re-check its rules.
    generation: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[float] = mapped_column(Float)


class InstanceRow(Base):
    __tablename__ = "instances"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    image: Mapped[str] = mapped_column(String(255))
    # The manifest digest the image reference resolved to at create time, when the
    # controller's registry holds the image: the instance runs exactly that content.
    image_digest: Mapped[str | None] = mapped_column(String(71), nullable=True)
    driver: Mapped[str | None] = mapped_column(String(16), nullable=True)
    command: Mapped[list[Any]] = mapped_column(JSON)
    env: Mapped[dict[str, Any]] = mapped_column(JSON)
    labels: Mapped[dict[str, Any]] = mapped_column(JSON)
    vcpus: Mapped[int] = mapped_column(Integer)
    memory: Mapped[int] = mapped_column(Integer)
    disk: Mapped[int] = mapped_column(Integer)
    net: Mapped[int] = mapped_column(Integer)
    placement_group_id: Mapped[str | None] = mapped_column(
        ForeignKey("placement_groups.id"), nullable=True, index=True
    )
    host_id: Mapped[str | None] = mapped_column(ForeignKey("hosts.id"), nullable=True, index=True)
    desired_power: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    status_message: Mapped[str] = mapped_column(Text, default="")
    # The instance's use (cpu_millicores, memory_mib, net_mbps...) at the last sample.
    usage: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # The instance's network address on its host, as the agent reports it.
    address: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # Why it went where it went: the placement engine's explanation at create time.
    placement: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # Local scaling: the policy its host's scaling manager applies (None: no policy).
    # A sibling carved out of a parent points at it; the columns above then hold the
    # resources carved, and the parent's hold what it kept, so a host's allocation
    # stays the sum of its instances' rows.
    scaling_policy: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    parent_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    # Only hosts whose attestation is `trusted` may run it (secure instances by default).
    trusted_host: Mapped[bool] = mapped_column(Boolean, default=False)
    # Where the instance's service answers for the parent and its siblings ("ip:port").
    endpoint: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # Execution monitoring: probes, detectors, remedies (None: defaults), and the remedies
    # the controller applied ({"migrations": [times], "backoff_until": t, "last": {...}}).
    health_policy: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    remedies: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # Host labels it needs (key=value): kept for every later placement (migration, moves).
    required_labels: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)

    @property
    def resources(self) -> Resources:
        return Resources(self.vcpus, self.memory, self.disk, self.net)


class OperationRow(Base):
    """A long-running action as a persisted state machine: a restarted controller resumes it."""

    __tablename__ = "operations"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), index=True)
    instance_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    instance_name: Mapped[str] = mapped_column(String(63))
    host_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    step: Mapped[str] = mapped_column(String(32), default="")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str] = mapped_column(Text, default="")
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    deadline: Mapped[float] = mapped_column(Float)


class EventRow(Base):
    """Append-only: rows are inserted, never updated or deleted."""

    __tablename__ = "events"
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    at: Mapped[float] = mapped_column(Float, index=True)
    kind: Mapped[str] = mapped_column(String(64), index=True)
    subject: Mapped[str] = mapped_column(String(128), index=True)
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any]] = mapped_column(JSON)


class HostSampleRow(Base):
    """A host's utilization (fractions of capacity) at one time: the forecast's history."""

    __tablename__ = "host_samples"
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    host_id: Mapped[str] = mapped_column(String(32), index=True)
    at: Mapped[float] = mapped_column(Float, index=True)
    cpu: Mapped[float] = mapped_column(Float)
    memory: Mapped[float] = mapped_column(Float)
    net: Mapped[float] = mapped_column(Float)


class CachePinRow(Base):
    """An image an operator wants in every host's cache, whatever its popularity."""

    __tablename__ = "cache_pins"
    image: Mapped[str] = mapped_column(String(255), primary_key=True)
    created_at: Mapped[float] = mapped_column(Float)


class EnrolmentRow(Base):
    """A host's TPM enrolment (trust.EnrolmentRecord): public keys only, keyed by host name,
    since an operator enrols a host before its agent first registers."""

    __tablename__ = "host_enrolments"
    host_name: Mapped[str] = mapped_column(String(63), primary_key=True)
    record: Mapped[dict[str, Any]] = mapped_column(JSON)
    ak_fingerprint: Mapped[str] = mapped_column(String(71))
    release_key_id: Mapped[str] = mapped_column(String(71))
    enrolled_at: Mapped[float] = mapped_column(Float)
    # The release version handed to the host's boot step last: what it must have booted.
    release_version: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class ReleaseRow(Base):
    """A published, signed release manifest (stage `release`). The highest version is the
    one every host is assigned: publishing a newer one rolls it out."""

    __tablename__ = "releases"
    version: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    label: Mapped[str] = mapped_column(String(128))
    digest: Mapped[str] = mapped_column(String(71))
    signed: Mapped[dict[str, Any]] = mapped_column(JSON)
    published_at: Mapped[float] = mapped_column(Float)


class SettingRow(Base):
    """Small controller-wide key/values (e.g. the schema's first-start marker)."""

    __tablename__ = "settings"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


__all__ = [
    "Base",
    "CachePinRow",
    "ClusterRow",
    "EnrolmentRow",
    "EventRow",
    "HostSampleRow",
    "HostRow",
    "InstanceRow",
    "OperationRow",
    "PlacementGroupRow",
    "ReleaseRow",
    "SettingRow",
    "SiteRow",
]
