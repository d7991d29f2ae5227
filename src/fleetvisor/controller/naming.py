"""Names users give to things: DNS labels, so they work as hostnames and in URLs."""

from __future__ import annotations

import re
import uuid

from fleetvisor.errors import InvalidInput

_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def check_name(kind: str, name: str) -> str:
    if not _LABEL.match(name or ""):
        raise InvalidInput(
            f"{kind} name {name!r} is not valid: use 1-63 lowercase letters, digits and '-', "
            "starting and ending with a letter or digit (e.g. web-1)"
        )
    return name


def new_id() -> str:
    return uuid.uuid4().hex
