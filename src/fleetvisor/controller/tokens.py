"""Bearer tokens: the admin token (a file in the state dir, mode 0600) and host tokens.

Tokens are random; only their SHA-256 is kept in the database.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

ADMIN_TOKEN_FILE = "admin.token"


def new_token(prefix: str) -> str:
    return f"{prefix}_{secrets.token_urlsafe(32)}"


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def same(token: str, expected_digest: str) -> bool:
    return hmac.compare_digest(digest(token), expected_digest)


def load_or_create_admin_token(state_dir: Path) -> str:
    """The admin token, made at first start. The file is created 0600 and never widened."""
    path = state_dir / ADMIN_TOKEN_FILE
    if path.exists():
        return path.read_text().strip()
    state_dir.mkdir(parents=True, exist_ok=True)
    token = new_token("fva")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    return token
