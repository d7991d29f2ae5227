"""Integration tests drive real runc, QEMU, network namespaces and cgroups; they need root
and skip, with the reason printed, on machines that lack a part."""

from __future__ import annotations

