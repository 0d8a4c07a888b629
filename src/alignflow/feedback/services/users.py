"""Users, API tokens and QC actions, and the one rule of who may manage whom (`can_manage`).

A `viewer` of `None` is the operator at the command line: whoever can run `alignflow users ...` already holds
the database, so the CLI acts with an admin's reach.
"""

from __future__ import annotations

import hashlib
import re

from sqlalchemy import select
from sqlalchemy.orm import Session

from alignflow.feedback import auth, engine
from alignflow.feedback.fields import INT32_MAX, INT32_MIN, USERNAME_CHARS, text_problem
from alignflow.feedback.models import ApiToken, QcAction, User
from alignflow.feedback.services.errors import Conflict, Forbidden, Invalid, NotFound

MANAGERS = ("admin", "lead")


def can_manage(viewer: User | None, target: User) -> bool:
    """Whether `viewer` may act on `target` (QC actions and their reverts, reading their answers and figures).

    An admin (or the CLI operator, `viewer=None`) manages everyone. A lead manages only the annotators of
    their own pod: not reviewers, other leads or admins, and a lead without a pod manages no one (a missing
    pod must never match the other pod-less accounts).
    """
    if viewer is None or viewer.role == "admin":
        return True
    return (
        viewer.role == "lead"
        and viewer.pod is not None
        and target.role == "annotator"
        and target.pod == viewer.pod
    )


def can_see(viewer: User | None, target: User) -> bool:
    """Whether `viewer` may see `target` in listings and reports: themselves, or anyone they manage."""
    return viewer is None or viewer.id == target.id or can_manage(viewer, target)


def own_qc_state(user: User) -> str:
    """The QC state a user is shown about themselves (`/me`, the page header).

    "recertify" is shown as "restrict": a user under recertification is given only gold items, so being told
    so would mark every task they see as gold. Both states mean the same thing to the user (limited access
    until a lead lifts it), and a restricted user's tasks are a mix of gold and normal items. Leads and admins
    see the real state in user lists and reports.
    """
    return "restrict" if user.qc_state == "recertify" else user.qc_state


def get_user(s: Session, user: User | int | str) -> User:
    """The user row for a row, an id or a username (NotFound otherwise)."""
    if isinstance(user, User):
        row = s.get(User, user.id)
    elif isinstance(user, int):
        row = s.get(User, user) if INT32_MIN <= user <= INT32_MAX else None
    elif text_problem(user) or len(user) > USERNAME_CHARS:
        row = None  # no stored username can match, and PostgreSQL would refuse the query
    else:
        row = s.scalar(select(User).where(User.username == user))
    if row is None:
        raise NotFound(f"no user {user!r}")
    return row


_user = get_user  # the name the QC and export modules and older callers use


def _actor_id(s: Session, actor: User | int | str | None) -> int | None:
    return get_user(s, actor).id if actor is not None else None


def list_users(s: Session, viewer: User | None = None) -> list[User]:
    """Every user `viewer` may see (`can_see`), by id."""
    return [u for u in s.scalars(select(User).order_by(User.id)) if can_see(viewer, u)]


def add_user(
    s: Session,
    username: str,
    password: str,
    role: str,
    pod: str | None = None,
    tier: str = "standard",
    actor: User | int | str | None = None,
) -> User:
    """Create a user (argon2-hashed password). Commits.

    Raises:
        Invalid: bad role, username or password; Conflict: the username exists.
    """
    engine.begin_write(s)
    try:
        user = auth.create_user(s, username, password, role, pod=pod, tier=tier, actor_id=_actor_id(s, actor))
        s.commit()
        return user
    except ValueError as exc:
        s.rollback()
        raise (Conflict if "already exists" in str(exc) else Invalid)(str(exc)) from exc
    except Exception:
        s.rollback()
        raise


_SECRET_OPTION = re.compile(r"key|secret|token|password", re.IGNORECASE)
_URL_CREDENTIALS = re.compile(r"://[^/@#]+@")


def public_judge_spec(spec: str) -> str:
    """`spec` as it may be stored: options whose name looks secret (api_key, token, ...) and credentials in a
    URL are replaced by ``***``. Specs carry none by design (``${ENV:...}`` references are kept as they are),
    but an account row outlives the command line, so nothing secret-looking is written."""
    from alignflow.judges.base import split_spec

    base, options = split_spec(spec)
    base = _URL_CREDENTIALS.sub("://***@", base)
    if not options:
        return base
    shown = {
        k: v if not _SECRET_OPTION.search(k) or v.startswith("${ENV:") else "***" for k, v in options.items()
    }
    return base + "#" + ",".join(f"{k}={v}" for k, v in shown.items())


def judge_username(spec: str) -> str:
    """The default account name of a judge: ``ai-`` + the spec's letters and digits + a hash of the spec."""
    public = public_judge_spec(spec)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", public).strip("-")[:48]
    return f"ai-{slug}-{hashlib.sha256(public.encode()).hexdigest()[:8]}"


def add_ai_user(s: Session, username: str, judge_spec: str, actor: User | int | str | None = None) -> User:
    """Create the annotator account of kind "ai" an AI judge submits through, or return the existing one.
    Commits.

    The account has no usable password: it cannot log in or hold a web session or API token. The stored spec
    is `public_judge_spec(judge_spec)`.

    Raises:
        Invalid: bad username or spec; Conflict: the name belongs to a person, or to a judge with another spec
            (one account is one judge, so its agreement figures mean one thing).
    """
    public = public_judge_spec(judge_spec)
    engine.begin_write(s)
    try:
        existing = s.scalar(select(User).where(User.username == username))
        if existing is not None:
            s.rollback()
            if existing.kind != "ai":
                raise Conflict(f"user {username!r} is a person's account, not an AI judge's", "name")
            if existing.judge_spec != public:
                raise Conflict(
                    f"user {username!r} is the account of judge {existing.judge_spec!r}, not {public!r}; "
                    "give this judge another --name",
                    "name",
                )
            return existing
        user = auth.create_ai_user(s, username, public, actor_id=_actor_id(s, actor))
        s.commit()
        return user
    except ValueError as exc:
        s.rollback()
        raise Invalid(str(exc)) from exc
    except Exception:
        s.rollback()
        raise


def set_disabled(
    s: Session, username: str, disabled: bool = True, actor: User | int | str | None = None
) -> User:
    """Disable (or enable) a user: a disabled user's sessions end and their tokens stop at once. Commits."""
    engine.begin_write(s)
    try:
        u = get_user(s, username)
        auth.set_disabled(s, u, disabled, actor_id=_actor_id(s, actor))
        s.commit()
        return u
    except Exception:
        s.rollback()
        raise


def create_token(
    s: Session, viewer: User | None, username: str, name: str, scopes: list[str]
) -> tuple[ApiToken, str]:
    """Issue an API token for `username`; returns the row and the raw token (shown once). Commits.

    Admins (and the CLI) issue tokens for anyone; everyone else only for themselves, and the 'manage' scope
    only to leads and admins.
    """
    engine.begin_write(s)
    try:
        u = get_user(s, username)
        if u.kind == "ai":
            raise Invalid(f"user {u.username!r} is an AI judge's account; it has no credentials", "username")
        if viewer is not None and viewer.role != "admin":
            if u.id != viewer.id:
                raise Forbidden("you may only create tokens for yourself")
            if "manage" in scopes and u.role not in MANAGERS:
                raise Forbidden("the 'manage' scope is for leads and admins", "scopes")
        if text_problem(name) or not 1 <= len(name) <= 64:
            raise Invalid("name: 1-64 characters, no NUL", "name")
        try:
            row, raw = auth.create_token(s, u, name, scopes, actor_id=viewer.id if viewer else None)
        except ValueError as exc:
            raise Invalid(str(exc), "scopes") from exc
        s.commit()
        return row, raw
    except Exception:
        s.rollback()
        raise


def revoke_token(s: Session, viewer: User | None, token_id: int) -> None:
    """Revoke a token: one's own, or anyone's for an admin or the CLI. Commits."""
    engine.begin_write(s)
    try:
        row = s.get(ApiToken, token_id) if 1 <= token_id <= INT32_MAX else None
        if row is None or (viewer is not None and viewer.role != "admin" and row.user_id != viewer.id):
            raise NotFound(f"no token {token_id} of yours" if viewer else f"no token with id {token_id}")
        auth.revoke_token(s, token_id, actor_id=viewer.id if viewer else None)
        s.commit()
    except Exception:
        s.rollback()
        raise


def apply_qc(s: Session, viewer: User | None, username: str, action: str, reason: str = "") -> QcAction:
    """Apply a QC action (coach, restrict, recertify, suspend) to a user `viewer` manages. Commits."""
    if text_problem(reason):
        raise Invalid(f"reason: {text_problem(reason)}", "reason")
    engine.begin_write(s)
    try:
        u = get_user(s, username)
        if not can_manage(viewer, u):
            raise Forbidden(f"you may not manage user {u.username!r}")
        try:
            row = engine.apply_qc_action(s, u, action, reason, viewer.id if viewer else None)
        except ValueError as exc:
            raise Invalid(str(exc), "action") from exc
        s.commit()
        return row
    except Exception:
        s.rollback()
        raise


def revert_qc(s: Session, viewer: User | None, action_id: int) -> User:
    """Revert a QC action on a user `viewer` manages; returns that user (with their new `qc_state`). Commits."""
    engine.begin_write(s)
    try:
        row = s.get(QcAction, action_id) if 1 <= action_id <= INT32_MAX else None
        if row is None:
            raise NotFound(f"no QC action {action_id}")
        target = s.get(User, row.user_id)
        if not can_manage(viewer, target):
            raise Forbidden(f"you may not manage user {target.username!r}")
        engine.revert_qc_action(s, action_id, viewer.id if viewer else None)
        s.commit()
        return target
    except Exception:
        s.rollback()
        raise


def end_session(s: Session, session_token: str) -> None:
    """Log a browser session out. Commits."""
    auth.logout(s, session_token)
    s.commit()
