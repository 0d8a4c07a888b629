"""Passwords (argon2id), browser sessions, scoped API tokens; logins go through `limiter`.

Secrets are never stored: sessions and tokens keep only a SHA-256 of a 256-bit random token (a fast hash is
enough for high-entropy secrets; argon2 is for low-entropy passwords). Every lookup re-reads the user row, so
disabling a user stops their sessions and tokens on the very next request.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from alignflow.feedback import limiter
from alignflow.feedback.fields import POD_CHARS, text_problem
from alignflow.feedback.journal import record
from alignflow.feedback.models import ROLES, TIERS, ApiToken, User, WebSession

SCOPES = ("annotate", "review", "manage", "read")
SESSION_HOURS = 12
TOKEN_PREFIX = "af_"

_hasher = PasswordHasher()


def set_password_cost(time_cost: int, memory_cost_kib: int) -> None:
    """Change the argon2 cost of NEW hashes (old hashes keep verifying). Tests lower it; production keeps
    argon2-cffi's defaults (RFC 9106 low-memory profile: t=3, m=64 MiB)."""
    global _hasher, _DUMMY_HASH
    _hasher = PasswordHasher(time_cost=time_cost, memory_cost=memory_cost_kib)
    _DUMMY_HASH = _hasher.hash("not-a-real-password")


class AuthError(Exception):
    """Authentication failed (401) or was refused (429 when `rate_limited`)."""

    def __init__(self, message: str, rate_limited: bool = False) -> None:
        super().__init__(message)
        self.rate_limited = rate_limited


def now() -> datetime:
    return datetime.now(UTC)


def aware(t: datetime) -> datetime:
    # SQLite returns naive datetimes even for timezone=True columns; they were written in UTC.
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def hash_password(password: str) -> str:
    if len(password) < 8:
        raise ValueError("password: at least 8 characters required")
    if len(password) > 256 or text_problem(password):
        raise ValueError("password: at most 256 characters, no NUL or lone surrogate")
    return _hasher.hash(password)


def verify_password(stored_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(stored_hash, password)
    except (VerificationError, InvalidHashError, UnicodeEncodeError):
        # A lone surrogate cannot be encoded, so no stored password contains one.
        return False


def valid_username(username: str) -> bool:
    """1-64 letters, digits, '-' or '_' (the rule `create_user` enforces)."""
    return 0 < len(username) <= 64 and username.replace("_", "").replace("-", "").isalnum()


def create_user(
    s: Session,
    username: str,
    password: str,
    role: str,
    pod: str | None = None,
    tier: str = "standard",
    actor_id: int | None = None,
) -> User:
    if role not in ROLES:
        raise ValueError(f"role: must be one of {ROLES}, got {role!r}")
    if not valid_username(username):
        raise ValueError(f"username: 1-64 letters, digits, '-' or '_', got {username!r}")
    if pod is not None and (not pod or len(pod) > POD_CHARS or text_problem(pod)):
        raise ValueError(f"pod: 1-{POD_CHARS} characters, no NUL or lone surrogate, got {pod!r}")
    if tier not in TIERS:
        raise ValueError(f"tier: must be one of {TIERS}, got {tier!r}")
    if s.scalar(select(User).where(User.username == username)) is not None:
        raise ValueError(f"username: {username!r} already exists")
    user = User(username=username, password_hash=hash_password(password), role=role, pod=pod, tier=tier)
    s.add(user)
    s.flush()
    record(s, actor_id, "user.create", "user", user.id, {"username": username, "role": role, "pod": pod})
    return user


# Not an argon2 hash, so `verify_password` is False for every password: an ai account has no usable password.
NO_PASSWORD = "!ai-account"


def create_ai_user(s: Session, username: str, judge_spec: str, actor_id: int | None = None) -> User:
    """An annotator account of kind "ai" for a judge (`judge_spec` already free of secrets); no password."""
    if not valid_username(username):
        raise ValueError(f"username: 1-64 letters, digits, '-' or '_', got {username!r}")
    if not judge_spec or len(judge_spec) > 512 or text_problem(judge_spec):
        raise ValueError("judge spec: 1-512 characters, no NUL or lone surrogate")
    if s.scalar(select(User).where(User.username == username)) is not None:
        raise ValueError(f"username: {username!r} already exists")
    user = User(
        username=username, password_hash=NO_PASSWORD, role="annotator", kind="ai", judge_spec=judge_spec
    )
    s.add(user)
    s.flush()
    record(
        s,
        actor_id,
        "user.create",
        "user",
        user.id,
        {"username": username, "role": "annotator", "kind": "ai", "judge": judge_spec},
    )
    return user


def set_disabled(s: Session, user: User, disabled: bool, actor_id: int | None = None) -> None:
    user.disabled = disabled
    if disabled:
        # Sessions die at once; tokens are checked against `disabled` on every request anyway.
        s.execute(delete(WebSession).where(WebSession.user_id == user.id))
    record(s, actor_id, "user.disable" if disabled else "user.enable", "user", user.id, {})


def login(s: Session, username: str, password: str, client: str = "") -> tuple[User, str, str]:
    """Check a password and open a session; returns `(user, session_token, csrf_token)`. Commits.

    `client` is the caller's address. The attempt is counted by `limiter.reserve` (committed) before the hash,
    which runs in one of `limiter`'s hash slots and outside any transaction; then it is settled.

    Raises:
        AuthError: wrong credentials or disabled user (401); `rate_limited` (429) when the address or the
            account is over its limit, or no hash slot freed up in time.
    """
    if not valid_username(username):
        # No such user can exist (`create_user` enforces the same rule), so there is nothing to guess or
        # hash; and such a name (NUL bytes, surrogates, 65+ characters) is never written to the database.
        raise AuthError("invalid username or password")
    client = client[:64]
    try:
        attempt = limiter.reserve(s, username, client)
    except limiter.Refused as exc:
        raise AuthError(str(exc), rate_limited=True) from exc
    user = s.scalar(select(User).where(User.username == username))
    if user is not None and user.kind == "ai":
        user = None  # an AI judge's account never logs in; it fails exactly like an unknown name
    # Verify against a dummy hash for unknown users so response time does not reveal which usernames exist.
    stored = user.password_hash if user else _DUMMY_HASH
    s.commit()  # return the connection to the pool while this request waits for a slot and hashes
    try:
        with limiter.hash_slot():
            ok = verify_password(stored, password)
    except limiter.Refused as exc:
        limiter.drop(s, attempt)
        raise AuthError(str(exc), rate_limited=True) from exc
    if not ok or user is None or user.disabled:
        limiter.settle(s, attempt, succeeded=False)
        s.commit()
        raise AuthError("invalid username or password")
    limiter.settle(s, attempt, succeeded=True)
    token = secrets.token_urlsafe(32)
    csrf = secrets.token_urlsafe(24)
    s.add(
        WebSession(
            token_hash=sha256(token),
            user_id=user.id,
            csrf_token=csrf,
            expires_at=now() + timedelta(hours=SESSION_HOURS),
        )
    )
    record(s, user.id, "session.login", "user", user.id, {"client": client})
    s.commit()
    return user, token, csrf


_DUMMY_HASH = _hasher.hash("not-a-real-password")


@dataclass(frozen=True)
class Principal:
    """Who is calling: the user and what the credential allows."""

    user: User
    scopes: frozenset[str]
    via: str  # "session" | "token"
    csrf_token: str | None = None


def session_principal(s: Session, token: str) -> Principal | None:
    ws = s.get(WebSession, sha256(token))
    if ws is None or aware(ws.expires_at) < now():
        return None
    user = s.get(User, ws.user_id)
    if user is None or user.disabled or user.kind == "ai":
        return None
    return Principal(user, frozenset(SCOPES), "session", ws.csrf_token)


def logout(s: Session, token: str) -> None:
    s.execute(delete(WebSession).where(WebSession.token_hash == sha256(token)))


def create_token(
    s: Session, user: User, name: str, scopes: list[str], actor_id: int | None = None
) -> tuple[ApiToken, str]:
    """Issue an API token; returns the row and the raw token (shown once, never stored)."""
    bad = [sc for sc in scopes if sc not in SCOPES]
    if bad or not scopes:
        raise ValueError(f"scopes: each must be one of {SCOPES}, got {scopes}")
    raw = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(user_id=user.id, name=name, token_hash=sha256(raw), scopes=sorted(set(scopes)))
    s.add(row)
    s.flush()
    record(
        s, actor_id, "token.create", "token", row.id, {"user_id": user.id, "name": name, "scopes": row.scopes}
    )
    return row, raw


def revoke_token(s: Session, token_id: int, actor_id: int | None = None) -> None:
    row = s.get(ApiToken, token_id)
    if row is None:
        raise ValueError(f"token: no token with id {token_id}")
    if row.revoked_at is None:
        row.revoked_at = now()
        record(s, actor_id, "token.revoke", "token", token_id, {"user_id": row.user_id})


def token_principal(s: Session, raw: str) -> Principal | None:
    found = s.execute(
        select(ApiToken.scopes, User)
        .join(User, User.id == ApiToken.user_id)
        .where(ApiToken.token_hash == sha256(raw), ApiToken.revoked_at.is_(None))
    ).first()
    if found is None or found[1].disabled or found[1].kind == "ai":
        return None
    return Principal(found[1], frozenset(found[0]), "token")


def csrf_ok(principal: Principal, submitted: str | None) -> bool:
    if principal.via != "session":
        return True  # bearer tokens are not sent automatically by browsers, so CSRF does not apply
    return bool(submitted) and hmac.compare_digest(principal.csrf_token or "", submitted or "")
