"""What crosses the controller-agent boundary: an instance's spec and a host's report."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, Field

from fleetvisor.model.resources import Resources

MAX_INT = 2_000_000_000  # every count fits a 32-bit SQL INTEGER


def no_nul(value: str) -> str:
    """SQL text columns (PostgreSQL) cannot hold NUL; refuse it at the edge."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


SafeStr = Annotated[str, AfterValidator(no_nul)]


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


class InstanceReport(BaseModel):
    """An instance as its host sees it."""

    id: str
    name: str
    state: str  # "created" | "running" | "stopped"
    resources: ResourceVector
    started_at: float | None = None
    usage: dict[str, float] = {}


class HostInfo(BaseModel):
    """What a driver tells about its machine at registration."""

    capacity: ResourceVector
    cpu_model: str
    cpu_features: list[str] = []
    driver: str
    capabilities: list[str] = []


def spec_labels(spec: InstanceSpec, prefix: str) -> dict[str, Any]:
    """The labels of spec under `prefix` (e.g. driver knobs), prefix removed."""
    return {k[len(prefix) :]: v for k, v in spec.labels.items() if k.startswith(prefix)}
