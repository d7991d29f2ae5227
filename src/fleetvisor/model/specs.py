"""What crosses the controller-agent boundary: an instance's spec and a host's report."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, Field, StringConstraints

from fleetvisor.model.resources import Resources

MAX_INT = 2_000_000_000  # every count fits a 32-bit SQL INTEGER


def no_nul(value: str) -> str:
    """SQL text columns cannot hold NUL (PostgreSQL) or lone surrogates (JSON escapes such as
    \\ud800 that have no UTF-8 form); refuse both at the edge."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            raise ValueError("must be valid Unicode text (no lone surrogates)") from None
    return value


SafeStr = Annotated[str, AfterValidator(no_nul)]


# JSON has no NaN or infinity (PostgreSQL refuses them): numbers from agents must be finite.
Finite = Annotated[float, Field(allow_inf_nan=False)]


class ResourceVector(BaseModel):
    """Resources as the API writes them: integers in fixed units."""

    vcpus: int = Field(0, ge=0, le=MAX_INT, description="millicores (1000 = one CPU)")
    memory: int = Field(0, ge=0, le=MAX_INT, description="MiB")
    disk: int = Field(0, ge=0, le=MAX_INT, description="GiB")
    net: int = Field(0, ge=0, le=MAX_INT, description="Mbit/s")

    def to_resources(self) -> Resources:
        return Resources(self.vcpus, self.memory, self.disk, self.net)

    @classmethod
    def of(cls, resources: Resources) -> ResourceVector:
        return cls(**resources.as_dict())


class InstanceSpec(BaseModel):
    """Everything an agent needs to run an instance."""

    id: str
    name: str
    image: str
    command: list[str] = []
    env: dict[str, str] = {}
    labels: dict[str, str] = {}
    resources: ResourceVector
    # Local scaling (fleetvisor.model.scaling.ScalingPolicy as a dict; None: no policy).
    scaling: dict[str, Any] | None = None
    # Execution monitoring (fleetvisor.model.health.HealthPolicy as a dict; None: no probes,
    # default detectors and remedies).
    health: dict[str, Any] | None = None


class InstanceReport(BaseModel):
    """An instance as its host sees it."""

    id: Annotated[SafeStr, StringConstraints(max_length=64)]
    name: Annotated[SafeStr, StringConstraints(max_length=253)]
    state: str  # "created" | "running" | "stopped"
    resources: ResourceVector
    started_at: Finite | None = None
    address: Annotated[SafeStr, StringConstraints(max_length=64)] | None = None
    usage: dict[Annotated[SafeStr, StringConstraints(max_length=64)], Finite] = {}
    # Local scaling: a sibling names the instance it was carved from; a parent with a
    # policy gives the policy's digest and its service endpoint ("ip:port").
    parent: Annotated[SafeStr, StringConstraints(max_length=64)] | None = None
    scaling_digest: Annotated[SafeStr, StringConstraints(max_length=64)] | None = None
    endpoint: Annotated[SafeStr, StringConstraints(max_length=64)] | None = None


class HostInfo(BaseModel):
    """What a driver tells about its machine at registration."""

    capacity: ResourceVector
    cpu_model: Annotated[SafeStr, StringConstraints(max_length=255)]
    cpu_features: Annotated[
        list[Annotated[SafeStr, StringConstraints(max_length=64)]], Field(max_length=1024)
    ] = []
    driver: Annotated[SafeStr, StringConstraints(min_length=1, max_length=16)]
    capabilities: Annotated[
        list[Annotated[SafeStr, StringConstraints(max_length=64)]], Field(max_length=64)
    ] = []


class CachedLayer(BaseModel):
    digest: Annotated[SafeStr, StringConstraints(max_length=71)]
    size: int = Field(ge=0, le=1 << 50)


class CacheReport(BaseModel):
    """A host's shared image cache: what it holds and how it has served launches."""

    layers: Annotated[list[CachedLayer], Field(max_length=100_000)] = []
    counters: Annotated[
        dict[Annotated[SafeStr, StringConstraints(max_length=64)], Finite], Field(max_length=64)
    ] = {}


def spec_labels(spec: InstanceSpec, prefix: str) -> dict[str, Any]:
    """The labels of spec under `prefix` (e.g. driver knobs), prefix removed."""
    return {k[len(prefix) :]: v for k, v in spec.labels.items() if k.startswith(prefix)}
