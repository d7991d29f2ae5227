"""Small helpers for async streams."""

from __future__ import annotations

from collections.abc import AsyncIterator


async def prepend(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """`first`, then everything `rest` yields: lets a caller pull one chunk early (so
    errors surface before a response starts) without losing it."""
    if first:
        yield first
    async for chunk in rest:
        yield chunk
