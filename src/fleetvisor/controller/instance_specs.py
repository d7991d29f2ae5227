"""What the controller sends an agent to create an instance: its spec from its row."""

from __future__ import annotations

from fleetvisor.images.store import Reference
from fleetvisor.model.specs import InstanceSpec, ResourceVector
from fleetvisor.store.tables import InstanceRow


def instance_spec(instance: InstanceRow) -> InstanceSpec:
    """The instance's spec at its row's size (a parent's whole size once its siblings'
    rows are folded back into it)."""
    image = instance.image
    if instance.image_digest:  # the exact content resolved at create time
        image = f"{Reference.parse(image).name}@{instance.image_digest}"
    return InstanceSpec(
        id=instance.id,
        name=instance.name,
        image=image,
        command=instance.command,
        env=instance.env,
        labels=instance.labels,
        resources=ResourceVector.of(instance.resources),
        scaling=instance.scaling_policy,
        health=instance.health_policy,
    )
