"""HTTP Basic authentication (RFC 7617) against an htpasswd file of bcrypt hashes.

bcrypt is slow on purpose (milliseconds per check): checking it on every request would make
an authenticated route a hundred times slower than an open one, and an easy CPU target. So
a credential that verified is remembered for ``REMEMBER`` seconds, in a table bounded to
``MAX_REMEMBERED`` entries (least recently used dropped first), keyed by a digest of the
Authorization value (the password itself is not kept). A wrong password is never
remembered: every attempt costs the attacker a bcrypt, and rate_limit is the answer to
guessing.

Only bcrypt hashes (``$2a$``, ``$2b$``, ``$2y$``: ``htpasswd -B``) are accepted: ``{SHA}`` is
unsalted SHA-1, ``$apr1$`` MD5 and crypt(3) DES, all cheap to brute-force.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import time
from collections import OrderedDict
from typing import Any

import bcrypt

REMEMBER = 300.0
MAX_REMEMBERED = 4096
_BCRYPT = (b"$2a$", b"$2b$", b"$2y$")


def read_users(path: str) -> dict[bytes, bytes]:
    """user -> bcrypt hash; ValueError names the line that is wrong."""
    users: dict[bytes, bytes] = {}
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            line = raw.strip()
            if not line or line.startswith(b"#"):
                continue
            user, sep, hashed = line.partition(b":")
            if not sep or not user:
                raise ValueError(f"line {number}: not user:hash")
            if hashed.startswith(b"{SHA}"):
                raise ValueError(f"line {number}: {{SHA}} hashes are unsalted SHA-1; make "
                                 "the file with htpasswd -B (bcrypt)")
            if not hashed.startswith(_BCRYPT):
                raise ValueError(f"line {number}: not a bcrypt hash (htpasswd -B); "
                                 "$apr1$, crypt and plain text are refused")
            users[user] = hashed
    if not users:
        raise ValueError("no users")
    return users


class BasicAuth:
    """A check before the handler: None to go on, or the 401 answer."""

    def __init__(self, users_file: str, realm: str, refuse: Any) -> None:
        self.users = read_users(users_file)
        challenge = realm.replace("\\", "\\\\").replace('"', '\\"')
        self.challenge = f'WWW-Authenticate: Basic realm="{challenge}", charset="UTF-8"\r\n' \
            .encode("ascii")
        self.refuse = refuse
        self.remembered: OrderedDict[bytes, float] = OrderedDict()

    def __call__(self, req: Any) -> tuple[int, bytes, object] | None:
        value = req.get(b"authorization")
        if value is not None:
            digest = hashlib.blake2b(value, digest_size=16).digest()
            until = self.remembered.get(digest)
            now = time.monotonic()
            if until is not None and until > now:
                return None
            if self.verify(value):
                self.remembered[digest] = now + REMEMBER
                self.remembered.move_to_end(digest)
                if len(self.remembered) > MAX_REMEMBERED:
                    self.remembered.popitem(last=False)
                return None
        status, headers, body = self.refuse(401)
        return status, self.challenge + headers, body

    def verify(self, value: bytes) -> bool:
        scheme, _, token = value.partition(b" ")
        if scheme.lower() != b"basic":
            return False
        try:
            decoded = base64.b64decode(token.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        user, sep, password = decoded.partition(b":")
        hashed = self.users.get(user)
        if not sep:
            return False
        if hashed is None:      # as slow as a wrong password: no telling which users exist
            hashed, user = next(iter(self.users.values())), b""
        if hashed.startswith(b"$2y$"):      # PHP's and htpasswd's name for $2b$
            hashed = b"$2b$" + hashed[4:]
        try:
            return bcrypt.checkpw(password, hashed) and bool(user)
        except ValueError:
            return False
