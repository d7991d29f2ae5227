"""Byte-exact encodings shared by manifests, event logs and evidence.

Signatures and PCR extends are over bytes, so every structure that is signed or
measured is first turned into canonical JSON: keys sorted, no insignificant
whitespace, UTF-8, integers and strings only (no floats, whose text form varies).
Digests are written `sha256:<64 lowercase hex>`, as everywhere else in fleetvisor.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from typing import Any

DIGEST_PREFIX = "sha256:"
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def canonical_json(value: Any) -> bytes:
    """The one byte form of `value` that is signed or hashed. Floats are refused."""
    _refuse_floats(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _refuse_floats(value: Any) -> None:
    if isinstance(value, float):
        raise ValueError("canonical JSON holds integers and strings only, not floats")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"canonical JSON keys are strings, not {type(key).__name__}")
            _refuse_floats(item)
    elif isinstance(value, list | tuple):
        for item in value:
            _refuse_floats(item)


def sha256_digest(data: bytes) -> str:
    """`sha256:<hex>` of `data`."""
    return DIGEST_PREFIX + hashlib.sha256(data).hexdigest()


def is_digest(value: object) -> bool:
    """True when `value` is a well-formed `sha256:<64 lowercase hex>` string."""
    return isinstance(value, str) and _DIGEST.fullmatch(value) is not None


def digest_bytes(digest: str) -> bytes:
    """The 32 raw bytes of a `sha256:<hex>` digest."""
    if not is_digest(digest):
        raise ValueError(f"{digest!r} is not a digest of the form sha256:<64 lowercase hex>")
    return bytes.fromhex(digest[len(DIGEST_PREFIX) :])


def b64encode(data: bytes) -> str:
    """Standard base64 text of `data` (for JSON transport)."""
    return base64.b64encode(data).decode("ascii")


def b64decode(text: str, what: str) -> bytes:
    """Bytes of standard base64 `text`; ValueError naming `what` if it is not base64."""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, AttributeError) as exc:
        raise ValueError(f"{what} is not valid base64") from exc
