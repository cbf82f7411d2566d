"""Per-person bearer tokens for the pose API, stored hashed.

The tokens file (default `{store}/auth/tokens.json`, any fsspec URL) maps person
ids to `sha256:<hex>` of a random token; the plaintext is printed once when the
token is made and never stored. Tokens are 32 random bytes, so a plain sha256 is
enough (no password-style stretching needed). A token only opens its own
person: another person's token is a 403 like a wrong one.

    posettp token add --store URL --person alice      # prints the token
    posettp token revoke --store URL --person alice
"""
from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import sys
import threading
import time

from model import io
from store.policy import check_person_id

PREFIX = "sha256:"
FORMAT = "posettp-tokens"


class AuthError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def hash_token(token: str) -> str:
    return PREFIX + hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(32)


def default_tokens_url(store: str) -> str:
    return io.join(store, "auth", "tokens.json")


def read_tokens(url: str) -> dict[str, str]:
    """person id -> stored hash; an absent file is an empty table."""
    if not io.exists(url):
        return {}
    data = json.loads(io.read_bytes(url))
    persons = data.get("persons", {}) if isinstance(data, dict) else {}
    if not isinstance(persons, dict) or not all(isinstance(v, str) and v.startswith(PREFIX) for v in persons.values()):
        raise ValueError(f"{url}: not a {FORMAT} file (persons must map ids to '{PREFIX}<hex>')")
    return dict(persons)


def write_tokens(url: str, persons: dict[str, str]) -> None:
    body = {"format": FORMAT, "format_version": 1, "updated_at": time.time(), "persons": dict(sorted(persons.items()))}
    io.write_bytes_atomic(url, json.dumps(body, indent=2).encode())


def add_token(url: str, person_id: str, token: str | None = None) -> str:
    """Give `person_id` a (new) token; returns the plaintext, which is not stored."""
    check_person_id(person_id)
    token = token or new_token()
    with io.updating(url):
        persons = read_tokens(url)
        persons[person_id] = hash_token(token)
        write_tokens(url, persons)
    return token


def remove_token(url: str, person_id: str) -> bool:
    with io.updating(url):
        persons = read_tokens(url)
        found = persons.pop(person_id, None) is not None
        write_tokens(url, persons)
    return found


def bearer(authorization: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` header, or AuthError(401)."""
    if not authorization:
        raise AuthError(401, "missing bearer token (Authorization: Bearer <token>)")
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthError(401, "malformed Authorization header: expected 'Bearer <token>'")
    return token


class TokenTable:
    """The hashed tokens, re-read at most every `ttl_s` so new tokens work without a restart."""

    def __init__(self, url: str, ttl_s: float = 5.0):
        self.url = url
        self.ttl_s = ttl_s
        self._persons: dict[str, str] = {}
        self._loaded_at = -float("inf")
        self._lock = threading.Lock()

    def stale(self) -> bool:
        return time.monotonic() - self._loaded_at > self.ttl_s

    def reload(self) -> None:
        with self._lock:
            persons = read_tokens(self.url)
            self._persons, self._loaded_at = persons, time.monotonic()

    def check(self, person_id: str, authorization: str | None) -> None:
        """Raise AuthError(401) without a token, AuthError(403) for a token that is not this person's."""
        token = bearer(authorization)
        presented = hash_token(token)
        stored = self._persons.get(person_id)
        # compare even when the person has no token, so timing says nothing about who has one
        ok = hmac.compare_digest(presented, stored or hash_token(secrets.token_hex(8)))
        if stored is None or not ok:
            raise AuthError(403, f"token not valid for person {person_id!r}")


def token_command(args) -> int:
    """`posettp token add|list|revoke`: `add` prints the new token alone on its last line."""
    url = args.tokens or default_tokens_url(args.store)
    if args.action == "list":
        print("\n".join(sorted(read_tokens(url))))
        return 0
    if not args.person:
        raise ValueError(f"{args.action} needs --person")
    if args.action == "add":
        print(add_token(url, args.person))
        return 0
    if not remove_token(url, args.person):
        print(f"person {args.person!r} had no token", file=sys.stderr)
        return 1
    return 0
