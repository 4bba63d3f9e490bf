"""The identity service: users, sessions, PATs, domains, members, backends, policies, limits.

:class:`Identity` is the database-backed :class:`proxy.directory.Directory` the gateway uses,
and the model behind the admin API. Every method is a coroutine; password hashing runs in
threads; every change is one transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import jwt
import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError

from attestation.errors import AttestationError
from attestation.policy import Policy
from cube._tasks import cancel_and_wait
from proxy.db import Database, DatabaseError, migrate
from proxy.db.engine import redacted_spec
from proxy.db.notify import ChangeNotices
from proxy.db.schema import (
    audit,
    backends,
    domains,
    issued_aliases,
    login_attempts,
    members,
    passwords,
    pats,
    refresh_tokens,
    sessions,
    usage,
    users,
)
from proxy.directory import (
    ROLE_ACTIONS,
    AuditRecord,
    AuthError,
    BackendSpec,
    Caller,
    Directory,
    DomainLimits,
    TokenSigner,
)
from proxy.identity import credentials
from proxy.identity._cache import LoadingCache, SharedGeneration
from proxy.identity.config import ADMIN_EMAIL_ENV, ADMIN_PASSWORD_ENV, IdentityConfig
from proxy.identity.errors import (
    Conflict,
    Forbidden,
    IdentityError,
    Invalid,
    NotFound,
    TooManyAttempts,
    Unauthorized,
)
from proxy.identity.keys import ACCESS_AUDIENCE, ALGORITHM, ForwardSigner, KeyRing
from proxy.identity.models import (
    Domain,
    Member,
    Pat,
    Principal,
    TokenPair,
    User,
    check_actions,
    check_alias,
    check_backend_url,
    check_email,
    check_kind,
    check_limit,
    check_models,
    check_name,
    check_role,
    dump_list,
    load_list,
    normal_email,
)
from proxy.identity.oidc import OidcVerifier
from proxy.identity.passwords import PasswordHashing, check_password_rules
from proxy.identity.records import RecordWriter, audit_values, storable

__all__ = ["DomainAccess", "Identity", "StartupError", "as_directory"]

log = logging.getLogger("cube.proxy.identity")
T = TypeVar("T")

ACCESS_LEEWAY_SECONDS = 10
_CACHE_MAX = 10_000
_LAST_USED_EVERY = 60.0
#: Even with no configured maximum, a PAT's lifetime must stay a representable time.
_PAT_TTL_CEILING = 100 * 365 * 24 * 3600
_ADMIN_POWERS = frozenset({"manage_domain", "manage_members", "manage_backends"})
#: Whose registration it is stays unsaid: another domain's backends are not for this one to see.
_BACKEND_URL_TAKEN = (
    "this agent URL is already a backend, of this domain or another (an agent serves one "
    "domain: the audience of its tokens)"
)


class StartupError(Exception):
    """The identity layer cannot start (message safe to print)."""


@dataclass(frozen=True)
class DomainAccess:
    """What a principal may do in one domain (resolved per admin request)."""

    domain: Domain
    role: str | None  # None: a platform admin who is not a member
    actions: frozenset[str]
    by_token: bool = False  # through a personal access token, not a login

    def require(self, action: str) -> None:
        if action not in self.actions:
            raise Forbidden(f"this requires the {action!r} right in domain {self.domain.alias!r}")

    @property
    def is_owner(self) -> bool:
        """An owner acting with a login. A PAT never carries the owner's own powers (grant or
        take the owner role, delete the domain): a leaked token with ``manage_members`` must
        not be enough to make someone else owner and take the domain over."""
        return self.role == "owner" and not self.by_token


def _now() -> float:
    return time.time()


async def _migrate(db: Database) -> list[int]:
    """Migrate ``db``; on PostgreSQL over a connection with no statement timeout: a
    migration may rewrite a large table, and a replica starting meanwhile waits for the
    migration lock as long as that takes."""
    if db.dialect != "postgresql":
        return await migrate(db)
    patient = Database.open(db.url, pool_size=1, command_timeout=None)
    try:
        return await migrate(patient)
    finally:
        await patient.close()


def _within_token_rights(access: DomainAccess, role: str, what: str) -> None:
    """Through a PAT, a member with a role whose rights exceed the token's own cannot be made
    (nor changed or removed): a leaked token with ``manage_members`` alone must not mint an
    admin, who could then point the domain's policy and backends at an agent of their own."""
    if access.by_token and ROLE_ACTIONS[role] - access.actions:
        raise Forbidden(
            f"this token may not {what} a member with the role {role!r}: the role's rights "
            "exceed the token's own (use a login, or a token holding those rights)"
        )


def _may_create_pat(role: str | None, wanted: frozenset[str], *, admin: bool) -> None:
    """Refuse a PAT with ``wanted`` rights to someone of ``role`` in its domain (None: not a
    member, to whom the domain does not exist unless a platform administrator)."""
    if role is None:
        if admin:
            raise Forbidden("only members of the domain can create tokens for it")
        raise NotFound("no such domain")
    missing = wanted - ROLE_ACTIONS[role]
    if missing:
        raise Forbidden(f"your role does not allow: {', '.join(sorted(missing))}")


def _foreign_key_violation(exc: IntegrityError) -> bool:
    """Whether ``exc`` is a row referring to one that is gone (PostgreSQL SQLSTATE 23503,
    SQLite's FOREIGN KEY constraint), not a duplicate (23505, UNIQUE)."""
    orig = exc.orig
    state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if isinstance(state, str) and state:
        return state == "23503"
    name = getattr(orig, "sqlite_errorname", None)
    if isinstance(name, str) and name:
        return name == "SQLITE_CONSTRAINT_FOREIGNKEY"
    return "FOREIGN KEY" in str(orig).upper()


def _database_failure(exc: BaseException) -> str:
    """Why a database could not be used, in words that carry no secret (a driver's message
    may quote its connection string; its error class and an OS error's text do not)."""
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        exc = exc.orig
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, DatabaseError):
        return str(exc)  # this project's own messages
    return type(exc).__name__


class Identity:
    """Users, sessions, tokens and domains over one :class:`Database`."""

    def __init__(
        self,
        db: Database,
        config: IdentityConfig,
        *,
        hashing: PasswordHashing | None = None,
    ) -> None:
        self.db = db
        self.config = config
        self.hashing = hashing or PasswordHashing(
            memory_kib=config.argon2_memory_kib,
            time_cost=config.argon2_time_cost,
            parallelism=config.argon2_parallelism,
        )
        self.keys = KeyRing(
            db,
            max_token_ttl=config.max_signed_token_ttl,
            rotation_seconds=config.key_rotation_seconds,
            secret=config.key_secret,
        )
        self._signer = ForwardSigner(
            self.keys, config.issuer_url, default_ttl=config.forward_token_ttl
        )
        self.records = RecordWriter(db)
        self.oidc = OidcVerifier(config.oidc) if config.oidc is not None else None
        shared = (
            SharedGeneration(config.shared_cache_file)
            if config.shared_cache_file is not None
            else None
        )
        self._cache = LoadingCache(config.auth_cache_seconds, max_entries=_CACHE_MAX, shared=shared)
        self._last_used: dict[str, float] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._refresher: asyncio.Task[None] | None = None
        self._notices: ChangeNotices | None = None

    # -- life cycle ---------------------------------------------------------------------------

    @classmethod
    async def open(
        cls, config: IdentityConfig, *, hashing: PasswordHashing | None = None
    ) -> Identity:
        """Open the database, migrate it, load (or create) the signing keys, bootstrap the
        admin, start the periodic refresh. Raises StartupError when it must not start."""
        try:
            db = Database.open(config.database)
        except (DatabaseError, OSError) as exc:
            where = redacted_spec(str(config.database))
            raise StartupError(
                f"cannot open the database {where}: {_database_failure(exc)}"
            ) from None
        try:
            applied = await _migrate(db)
            if applied:
                log.info("database migrated", extra={"versions": applied})
            identity = cls(db, config, hashing=hashing)
        except (OSError, SQLAlchemyError) as exc:
            await db.close()
            raise StartupError(
                f"cannot open the database {db.describe()}: {_database_failure(exc)}"
            ) from None
        except (TypeError, ValueError) as exc:
            # The driver's refusal of a URL option it does not know (asyncpg has no
            # ``sslmode``: it takes ``ssl``): the type only, the message may quote the value.
            await db.close()
            raise StartupError(
                f"cannot open the database {db.describe()}: the driver refused an option of "
                f"the URL ({type(exc).__name__}; asyncpg takes ssl=require, not sslmode=)"
            ) from None
        except BaseException:
            await db.close()
            raise
        try:
            await identity._start()
        except BaseException:
            await identity.close()
            raise
        return identity

    async def _start(self) -> None:
        try:
            await self.keys.load()
        except Exception as exc:
            raise StartupError(str(exc)) from exc
        await self.bootstrap_admin()
        if self.db.dialect == "postgresql":
            # Other replicas may share the database: tell each other about changes.
            self._notices = ChangeNotices(self.db, on_change=self._cache.clear)
            try:
                await self._notices.start()
            except Exception as exc:
                raise StartupError(
                    f"cannot listen for changes made by other replicas: {type(exc).__name__}"
                ) from None
        if self.oidc is not None:
            try:
                await self.oidc.start()
            except Exception as exc:
                raise StartupError(f"cannot load the OIDC issuer's JWKS: {exc}") from exc
        self._refresher = asyncio.create_task(self._refresh_loop(), name="cube-identity-refresh")

    async def _refresh_loop(self) -> None:
        interval = self.config.key_refresh_seconds
        oidc_due = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            try:
                await self.keys.refresh()
            except Exception as exc:
                log.warning("signing key refresh failed: %s", type(exc).__name__)
            try:
                await self.prune_login_attempts()
            except Exception as exc:
                log.warning("pruning login attempts failed: %s", type(exc).__name__)
            if self.oidc is not None and time.monotonic() >= oidc_due:
                try:
                    await self.oidc.refresh()
                except Exception as exc:  # (refresh logs its own; this loop must not end)
                    log.warning("OIDC JWKS refresh failed: %s", type(exc).__name__)
                oidc_due = time.monotonic() + self.oidc.config.jwks_refresh_seconds

    async def close(self) -> None:
        await cancel_and_wait(self._refresher)
        if self._notices is not None:
            await self._notices.close()
        for task in list(self._background):
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await task
        await self.records.close()
        if self.oidc is not None:
            await self.oidc.close()
        await self.db.close()

    def _invalidate(self) -> None:
        self._cache.clear()
        if self._notices is not None:
            self._notices.publish()  # the other replicas forget theirs too

    def invalidate(self) -> None:
        """Forget cached authentications and domain data (after a change made elsewhere)."""
        self._invalidate()

    def _spawn(self, coro: Awaitable[Any]) -> None:
        async def run() -> None:
            try:
                await coro
            except Exception as exc:
                log.warning("background update failed: %s", type(exc).__name__)

        task = asyncio.create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- bootstrap ----------------------------------------------------------------------------

    async def bootstrap_admin(self) -> User | None:
        """Create the first platform admin from the configuration (environment).

        - the bootstrap email names an existing user: nothing changes (the password in the
          environment is never applied to an existing account);
        - no platform admin exists yet: the user is created as platform admin;
        - the database has no users and no bootstrap variables are set: StartupError (a proxy
          nobody can administer must not start; there is never a default password).
        """
        email, password = self.config.admin_email, self.config.admin_password
        async with self.db.read() as conn:
            count = (await conn.execute(sa.select(sa.func.count()).select_from(users))).scalar()
            admins = (
                await conn.execute(
                    sa.select(sa.func.count()).select_from(users).where(users.c.is_admin)
                )
            ).scalar()
        if not email or not password:
            if email or password:
                raise StartupError(
                    f"set both {ADMIN_EMAIL_ENV} and {ADMIN_PASSWORD_ENV}, or neither"
                )
            if not count:
                raise StartupError(
                    f"the database has no users: set {ADMIN_EMAIL_ENV} and "
                    f"{ADMIN_PASSWORD_ENV} to create the first administrator"
                )
            return None
        try:
            email = check_email(email)
            check_password_rules(password)
        except Invalid as exc:
            raise StartupError(f"admin bootstrap: {exc.message}") from exc
        existing = await self.find_user(email)
        if existing is not None:
            return None
        if admins:
            log.info("admin bootstrap skipped: a platform administrator exists")
            return None
        try:
            user = await self.create_user(
                email=email, password=password, name="admin", is_admin=True
            )
        except Conflict:
            # Another replica, starting at the same moment, created it first.
            log.info("admin bootstrap skipped: another replica created the administrator")
            return None
        log.info("bootstrapped the first platform administrator", extra={"user_id": user.id})
        return user

    # -- users --------------------------------------------------------------------------------

    async def create_user(
        self,
        *,
        email: object,
        password: object = None,
        name: object = None,
        is_admin: bool = False,
    ) -> User:
        email_ = check_email(email)
        name_ = check_name(name)
        hashed = None
        if password is not None:
            hashed = await self.hashing.hash(check_password_rules(password))
        now = _now()
        user_id = credentials.new_id()
        try:
            async with self.db.write() as conn:
                await conn.execute(
                    sa.insert(users).values(
                        id=user_id,
                        email=email_,
                        name=name_,
                        is_admin=is_admin,
                        disabled=False,
                        created_at=now,
                        updated_at=now,
                    )
                )
                if hashed is not None:
                    await conn.execute(
                        sa.insert(passwords).values(user_id=user_id, hash=hashed, updated_at=now)
                    )
        except IntegrityError as exc:
            raise Conflict("a user with this email exists") from exc
        self._invalidate()
        return User(user_id, email_, name_, is_admin, False, now, now)

    async def get_user(self, user_id: str) -> User:
        async with self.db.read() as conn:
            row = (
                (await conn.execute(sa.select(users).where(users.c.id == user_id)))
                .mappings()
                .first()
            )
        if row is None:
            raise NotFound("no such user")
        return User.from_row(row)

    async def find_user(self, email: str) -> User | None:
        async with self.db.read() as conn:
            row = (
                (await conn.execute(sa.select(users).where(users.c.email == normal_email(email))))
                .mappings()
                .first()
            )
        return None if row is None else User.from_row(row)

    async def password_hash(self, user_id: str) -> str | None:
        async with self.db.read() as conn:
            value = (
                await conn.execute(
                    sa.select(passwords.c.hash).where(passwords.c.user_id == user_id)
                )
            ).scalar()
        return None if value is None else str(value)

    async def list_users(self, *, limit: int = 100, offset: int = 0) -> list[User]:
        async with self.db.read() as conn:
            rows = (
                (
                    await conn.execute(
                        sa.select(users).order_by(users.c.email).limit(limit).offset(offset)
                    )
                )
                .mappings()
                .all()
            )
        return [User.from_row(r) for r in rows]

    async def update_user(
        self,
        user_id: str,
        *,
        email: object = None,
        name: object = None,
        password: object = None,
        is_admin: bool | None = None,
        disabled: bool | None = None,
    ) -> User:
        values: dict[str, Any] = {}
        if email is not None:
            values["email"] = check_email(email)
        if name is not None:
            values["name"] = check_name(name)
        if is_admin is not None:
            values["is_admin"] = is_admin
        if disabled is not None:
            values["disabled"] = disabled
        hashed = None
        if password is not None:
            hashed = await self.hashing.hash(check_password_rules(password))
        now = _now()
        try:
            async with self.db.write() as conn:
                row, other_admins = await self._lock_user(conn, user_id)
                if row["is_admin"] and (is_admin is False or disabled is True) and not other_admins:
                    raise Conflict("this is the last enabled platform administrator")
                if values:
                    await conn.execute(
                        sa.update(users)
                        .where(users.c.id == user_id)
                        .values(**values, updated_at=now)
                    )
                if hashed is not None:
                    await self._store_password(conn, user_id, hashed, now)
                if disabled is True or hashed is not None:
                    # A disabled account, or one whose password changed, keeps no session.
                    await conn.execute(
                        sa.update(sessions)
                        .where(sessions.c.user_id == user_id, sessions.c.revoked_at.is_(None))
                        .values(
                            revoked_at=now,
                            revoked_reason="disabled" if disabled else "password_changed",
                        )
                    )
        except IntegrityError as exc:
            raise Conflict("a user with this email exists") from exc
        self._invalidate()
        return await self.get_user(user_id)

    async def _store_password(self, conn: Any, user_id: str, hashed: str, now: float) -> None:
        done = await conn.execute(
            sa.update(passwords)
            .where(passwords.c.user_id == user_id)
            .values(hash=hashed, updated_at=now)
        )
        if done.rowcount == 0:
            await conn.execute(
                sa.insert(passwords).values(user_id=user_id, hash=hashed, updated_at=now)
            )

    async def _lock_user(self, conn: Any, user_id: str) -> tuple[Mapping[str, Any], int]:
        """Lock ``user_id``'s row and every enabled platform administrator's, in id order (so
        two concurrent changes neither deadlock nor both take away the last administrator);
        the user's row and how many other enabled administrators there are."""
        rows = (
            (
                await conn.execute(
                    sa.select(users)
                    .where(
                        sa.or_(users.c.id == user_id, sa.and_(users.c.is_admin, ~users.c.disabled))
                    )
                    .order_by(users.c.id)
                    .with_for_update()
                )
            )
            .mappings()
            .all()
        )
        mine = [r for r in rows if r["id"] == user_id]
        if not mine:
            raise NotFound("no such user")
        return mine[0], len(rows) - 1

    async def _owned_domains(self, conn: Any, user_id: str) -> list[str]:
        return list(
            (
                await conn.execute(
                    sa.select(members.c.domain_id)
                    .where(members.c.user_id == user_id, members.c.role == "owner")
                    .order_by(members.c.domain_id)
                )
            )
            .scalars()
            .all()
        )

    async def delete_user(self, user_id: str) -> None:
        """Delete a user, unless that would leave no enabled platform administrator or a
        domain without an owner (409: give the domain another owner, or delete it, first)."""
        async with self.db.write() as conn:
            # Domains before users, each in id order: the order membership changes take them.
            for domain_id in await self._owned_domains(conn, user_id):
                await self._lock_domain(conn, domain_id)
            row, other_admins = await self._lock_user(conn, user_id)
            if row["is_admin"] and not other_admins:
                raise Conflict("this is the last enabled platform administrator")
            for domain_id in await self._owned_domains(conn, user_id):
                await self._keep_an_owner(
                    conn,
                    domain_id,
                    user_id,
                    "this user is the last owner of a domain: give it another owner, or delete "
                    "it, first",
                )
            await conn.execute(sa.delete(users).where(users.c.id == user_id))
        self._invalidate()

    # -- login, refresh, logout ---------------------------------------------------------------

    async def _count_attempt(self, email: str) -> None:
        """Count a login attempt for ``email`` before its password is checked, in the database
        (so every worker and replica share the count, and concurrent guesses cannot all pass
        one check); refuse once ``login_max_failures`` were made in the current window. A
        successful login clears the count."""
        key = hashlib.sha256(email.encode()).hexdigest()
        window = self.config.login_failure_window
        for attempt in (1, 2):
            now = time.time()
            try:
                async with self.db.write() as conn:
                    row = (
                        await conn.execute(
                            sa.select(login_attempts.c.attempts, login_attempts.c.window_start)
                            .where(login_attempts.c.key == key)
                            .with_for_update()
                        )
                    ).first()
                    if row is None:
                        await conn.execute(
                            sa.insert(login_attempts).values(key=key, attempts=1, window_start=now)
                        )
                        return
                    count, started = int(row[0]), float(row[1])
                    if now - started >= window:
                        count, started = 0, now
                    elif count >= self.config.login_max_failures:
                        raise TooManyAttempts(
                            "too many failed logins for this account; try again later",
                            retry_after=max(1, int(window - (now - started)) + 1),
                        )
                    await conn.execute(
                        sa.update(login_attempts)
                        .where(login_attempts.c.key == key)
                        .values(attempts=count + 1, window_start=started)
                    )
                    return
            except IntegrityError:
                if attempt == 2:
                    raise
                # Another process inserted this account's row first: count on it.

    async def _clear_attempts(self, email: str) -> None:
        key = hashlib.sha256(email.encode()).hexdigest()
        async with self.db.write() as conn:
            await conn.execute(sa.delete(login_attempts).where(login_attempts.c.key == key))

    async def prune_login_attempts(self) -> int:
        """Forget the counts whose window has passed; how many."""
        cutoff = time.time() - self.config.login_failure_window
        async with self.db.write() as conn:
            result = await conn.execute(
                sa.delete(login_attempts).where(login_attempts.c.window_start < cutoff)
            )
        return int(result.rowcount)

    async def check_password(self, user: User, password: str) -> bool:
        """Whether ``password`` is ``user``'s, counted against the same per-account failure
        limit as logins (raises :class:`TooManyAttempts` past it): a stolen session must not
        become an unlimited password-guessing oracle."""
        await self._count_attempt(user.email)
        matches, _ = await self.hashing.verify(await self.password_hash(user.id), password[:4096])
        if matches:
            await self._clear_attempts(user.email)
        return matches

    async def login(self, email: object, password: object) -> TokenPair:
        if not isinstance(email, str) or not isinstance(password, str):
            raise Invalid("email and password are required")
        email_ = normal_email(email)
        await self._count_attempt(email_)
        async with self.db.read() as conn:
            row = (
                (
                    await conn.execute(
                        sa.select(users.c.id, users.c.disabled, passwords.c.hash)
                        .select_from(users.outerjoin(passwords))
                        .where(users.c.email == email_)
                    )
                )
                .mappings()
                .first()
            )
        encoded = None if row is None else row["hash"]
        ok, rehash = await self.hashing.verify(encoded, password[:4096])
        if not ok or row is None or row["disabled"]:
            raise Unauthorized("invalid email or password", code="invalid_credentials")
        await self._clear_attempts(email_)
        user_id = str(row["id"])
        if rehash:
            hashed = await self.hashing.hash(password)
            async with self.db.write() as conn:
                await self._store_password(conn, user_id, hashed, _now())
        return await self.start_session(user_id)

    async def start_session(self, user_id: str) -> TokenPair:
        """A new session for an (already authenticated) user: access + refresh token."""
        now = _now()
        session_id = credentials.new_id()
        refresh = credentials.new_secret(credentials.REFRESH_PREFIX)
        refresh_expires = min(now + self.config.refresh_token_ttl, now + self.config.session_ttl)
        try:
            async with self.db.write() as conn:
                await conn.execute(
                    sa.insert(sessions).values(
                        id=session_id,
                        user_id=user_id,
                        created_at=now,
                        expires_at=now + self.config.session_ttl,
                    )
                )
                await conn.execute(
                    sa.insert(refresh_tokens).values(
                        id=credentials.new_id(),
                        session_id=session_id,
                        token_hash=credentials.secret_hash(refresh),
                        created_at=now,
                        expires_at=refresh_expires,
                    )
                )
        except IntegrityError:
            # The account was deleted meanwhile (through another replica or connection): as
            # for any login to an account that does not exist.
            raise Unauthorized("invalid email or password", code="invalid_credentials") from None
        return TokenPair(
            access_token=self._access_token(user_id, session_id),
            expires_in=self.config.access_token_ttl,
            refresh_token=refresh,
            refresh_expires_in=int(refresh_expires - now),
            session_id=session_id,
        )

    def _access_token(self, user_id: str, session_id: str) -> str:
        now = int(_now())
        return self.keys.sign(
            {
                "iss": self.config.issuer_url,
                "aud": ACCESS_AUDIENCE,
                "sub": user_id,
                "sid": session_id,
                "iat": now,
                "nbf": now,
                "exp": now + self.config.access_token_ttl,
                "jti": uuid.uuid4().hex,
                "token_use": "access",
            }
        )

    async def refresh(self, token: object) -> TokenPair:
        """Rotate a refresh token. Presenting one already rotated revokes its whole session."""
        if not isinstance(token, str) or not token.startswith(credentials.REFRESH_PREFIX):
            raise Unauthorized("invalid refresh token", code="invalid_refresh_token")
        digest = credentials.secret_hash(token)
        now = _now()
        new = credentials.new_secret(credentials.REFRESH_PREFIX)
        outcome: str
        user_id = session_id = ""
        refresh_expires = 0.0
        async with self.db.write() as conn:
            row = (
                (
                    await conn.execute(
                        sa.select(
                            refresh_tokens.c.id,
                            refresh_tokens.c.token_hash,
                            refresh_tokens.c.used_at,
                            refresh_tokens.c.expires_at,
                            sessions.c.id.label("session_id"),
                            sessions.c.revoked_at,
                            sessions.c.expires_at.label("session_expires_at"),
                            users.c.id.label("user_id"),
                            users.c.disabled,
                        )
                        .select_from(refresh_tokens.join(sessions).join(users))
                        .where(refresh_tokens.c.token_hash == digest)
                        # The refresh token's row only: locking its session and user too
                        # (in that order) would deadlock with a password change or a
                        # disable, which locks the user, then the sessions. A session
                        # revoked just after this read keeps its revocation: the rotated
                        # token is refused at its next use.
                        .with_for_update(of=refresh_tokens)
                    )
                )
                .mappings()
                .first()
            )
            if row is None or not credentials.same_secret_hash(row["token_hash"], digest):
                outcome = "unknown"
            elif row["revoked_at"] is not None:
                outcome = "revoked"
            elif row["used_at"] is not None:
                outcome = "reused"
            elif row["expires_at"] <= now or row["session_expires_at"] <= now:
                outcome = "expired"
            elif row["disabled"]:
                outcome = "disabled"
            else:
                done = await conn.execute(
                    sa.update(refresh_tokens)
                    .where(refresh_tokens.c.id == row["id"], refresh_tokens.c.used_at.is_(None))
                    .values(used_at=now)
                )
                outcome = "ok" if done.rowcount == 1 else "reused"
            if outcome == "reused":
                assert row is not None
                await conn.execute(
                    sa.update(sessions)
                    .where(sessions.c.id == row["session_id"], sessions.c.revoked_at.is_(None))
                    .values(revoked_at=now, revoked_reason="refresh_token_reuse")
                )
            elif outcome == "ok":
                assert row is not None
                user_id, session_id = str(row["user_id"]), str(row["session_id"])
                refresh_expires = min(
                    now + self.config.refresh_token_ttl, float(row["session_expires_at"])
                )
                await conn.execute(
                    sa.insert(refresh_tokens).values(
                        id=credentials.new_id(),
                        session_id=session_id,
                        token_hash=credentials.secret_hash(new),
                        created_at=now,
                        expires_at=refresh_expires,
                    )
                )
        if outcome == "reused":
            self._invalidate()
            log.warning(
                "a rotated refresh token was presented again: session revoked",
                extra={"session_id": row["session_id"] if row is not None else None},
            )
            raise Unauthorized(
                "this refresh token was already used; the session has been revoked",
                code="refresh_token_reused",
            )
        if outcome != "ok":
            raise Unauthorized(
                "the refresh token has expired"
                if outcome == "expired"
                else "invalid refresh token",
                code="invalid_refresh_token",
            )
        return TokenPair(
            access_token=self._access_token(user_id, session_id),
            expires_in=self.config.access_token_ttl,
            refresh_token=new,
            refresh_expires_in=int(refresh_expires - now),
            session_id=session_id,
        )

    async def logout(self, *, session_id: str | None = None, refresh_token: object = None) -> bool:
        """Revoke a session (by id, or by any of its refresh tokens). True if one was revoked."""
        now = _now()
        async with self.db.write() as conn:
            if session_id is None and isinstance(refresh_token, str):
                session_id = (
                    await conn.execute(
                        sa.select(refresh_tokens.c.session_id).where(
                            refresh_tokens.c.token_hash == credentials.secret_hash(refresh_token)
                        )
                    )
                ).scalar()
            if session_id is None:
                return False
            done = await conn.execute(
                sa.update(sessions)
                .where(sessions.c.id == session_id, sessions.c.revoked_at.is_(None))
                .values(revoked_at=now, revoked_reason="logout")
            )
        self._invalidate()
        return bool(done.rowcount)

    # -- authentication -----------------------------------------------------------------------

    async def authenticate_principal(self, bearer: str) -> Principal:
        """Who presents this bearer (access JWT, PAT or OIDC token), at the user level."""

        async def load() -> tuple[Principal, float | None]:
            found = await self._authenticate_principal(bearer)
            return found, found.expires_at

        # Through load(), which stores under the generation the lookup started in: a logout or
        # a disable committed meanwhile (clearing the cache) is not undone by this answer.
        principal: Principal = await self._cache.load(
            ("principal", credentials.secret_hash(bearer)), load
        )
        return principal

    async def _authenticate_principal(self, bearer: str) -> Principal:
        if not bearer or len(bearer) > 8192:
            raise Unauthorized("missing or oversized bearer token")
        if bearer.startswith(credentials.PAT_PREFIX):
            return await self._pat_principal(bearer)
        if bearer.startswith(credentials.REFRESH_PREFIX):
            raise Unauthorized("a refresh token is not a bearer token; use /auth/refresh")
        if bearer.count(".") != 2:
            raise Unauthorized("malformed bearer token")
        try:
            unverified = jwt.decode(bearer, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise Unauthorized("malformed bearer token") from exc
        if unverified.get("iss") == self.config.issuer_url:
            return await self._access_principal(bearer)
        if self.oidc is not None and self.oidc.is_ours(unverified):
            email_and_exp = await self.oidc.verify(bearer)
            user = await self.find_user(email_and_exp[0])
            if user is None or user.disabled:
                raise Unauthorized("no enabled user matches this token's email")
            return Principal(
                user=user,
                token_kind="oidc",  # noqa: S106 - a kind, not a secret
                expires_at=email_and_exp[1],
            )
        raise Unauthorized("the token's issuer is not trusted")

    async def _access_principal(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise Unauthorized("malformed bearer token") from exc
        kid = header.get("kid")
        if header.get("alg") != ALGORITHM or not isinstance(kid, str):
            raise Unauthorized("the token's header is not acceptable")
        key = self.keys.key_for(kid)
        if key is None and await self.keys.reload_if_unknown(kid):
            key = self.keys.key_for(kid)
        if key is None:
            raise Unauthorized("the token is signed by an unknown or expired key")
        try:
            claims = jwt.decode(
                token,
                key.public,
                algorithms=[ALGORITHM],
                audience=ACCESS_AUDIENCE,
                issuer=self.config.issuer_url,
                leeway=ACCESS_LEEWAY_SECONDS,
                options={"require": ["exp", "iat", "sub", "sid", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthorized("the access token has expired", code="token_expired") from exc
        except jwt.PyJWTError as exc:
            raise Unauthorized("the access token is not valid") from exc
        if claims.get("token_use") != "access":
            raise Unauthorized("not an access token")
        async with self.db.read() as conn:
            row = (
                (
                    await conn.execute(
                        sa.select(
                            users,
                            sessions.c.revoked_at.label("session_revoked_at"),
                            sessions.c.expires_at.label("session_expires_at"),
                        )
                        .select_from(users.join(sessions))
                        .where(users.c.id == claims["sub"], sessions.c.id == claims["sid"])
                    )
                )
                .mappings()
                .first()
            )
        if row is None or row["session_revoked_at"] is not None:
            raise Unauthorized("the session has ended", code="session_revoked")
        if row["session_expires_at"] <= _now():
            raise Unauthorized("the session has expired", code="token_expired")
        user = User.from_row(row)
        if user.disabled:
            raise Unauthorized("the account is disabled")
        return Principal(
            user=user,
            token_kind="access",  # noqa: S106 - a kind, not a secret
            session_id=str(claims["sid"]),
            expires_at=min(float(claims["exp"]), float(row["session_expires_at"])),
        )

    async def _pat_principal(self, token: str) -> Principal:
        digest = credentials.secret_hash(token)
        async with self.db.read() as conn:
            row = (
                (
                    await conn.execute(
                        sa.select(
                            users,
                            pats.c.id.label("pat_id"),
                            pats.c.token_hash,
                            pats.c.domain_id,
                            pats.c.actions,
                            pats.c.models,
                            pats.c.expires_at,
                            pats.c.revoked_at,
                            pats.c.last_used_at,
                        )
                        .select_from(pats.join(users))
                        .where(pats.c.token_hash == digest)
                    )
                )
                .mappings()
                .first()
            )
        if row is None or not credentials.same_secret_hash(row["token_hash"], digest):
            raise Unauthorized("invalid token")
        if row["revoked_at"] is not None:
            raise Unauthorized("the token has been revoked", code="token_revoked")
        if row["expires_at"] is not None and row["expires_at"] <= _now():
            raise Unauthorized("the token has expired", code="token_expired")
        user = User.from_row(row)
        if user.disabled:
            raise Unauthorized("the account is disabled")
        self._touch_pat(str(row["pat_id"]), row["last_used_at"])
        models = None if row["models"] is None else frozenset(load_list(row["models"]))
        return Principal(
            user=user,
            token_kind="pat",  # noqa: S106 - a kind, not a secret
            token_id=str(row["pat_id"]),
            pat_domain_id=str(row["domain_id"]),
            pat_actions=frozenset(load_list(row["actions"])),
            pat_models=models,
            expires_at=row["expires_at"],
        )

    def _touch_pat(self, pat_id: str, last_used: float | None) -> None:
        """Record last use, at most once a minute per token, off the request path."""
        now = _now()
        seen = max(last_used or 0.0, self._last_used.get(pat_id, 0.0))
        if now - seen < _LAST_USED_EVERY:
            return
        self._last_used[pat_id] = now
        if len(self._last_used) > _CACHE_MAX:
            self._last_used.pop(next(iter(self._last_used)))

        async def write() -> None:
            async with self.db.write() as conn:
                await conn.execute(
                    sa.update(pats).where(pats.c.id == pat_id).values(last_used_at=now)
                )

        self._spawn(write())

    async def _role(self, domain_id: str, user_id: str) -> str | None:
        async with self.db.read() as conn:
            role = (
                await conn.execute(
                    sa.select(members.c.role).where(
                        members.c.domain_id == domain_id, members.c.user_id == user_id
                    )
                )
            ).scalar()
        return None if role is None else str(role)

    # -- Directory ----------------------------------------------------------------------------

    async def authenticate(self, bearer: str, *, domain_alias: str | None) -> Caller:
        key = ("caller", credentials.secret_hash(bearer), domain_alias)

        async def load() -> tuple[Caller, float | None]:
            try:
                return await self._authenticate(bearer, domain_alias)
            except IdentityError as exc:
                status = 401 if exc.status == 401 else 403
                raise AuthError(status, exc.message, code=exc.code) from None

        caller: Caller = await self._cache.load(key, load)
        return caller

    async def _authenticate(
        self, bearer: str, domain_alias: str | None
    ) -> tuple[Caller, float | None]:
        principal = await self._authenticate_principal(bearer)
        if domain_alias is None:
            if principal.pat_domain_id is None:
                raise Forbidden(
                    "name a domain in the URL (/{domain}/v1/...); only a PAT bound "
                    "to a domain may use /v1/... directly"
                )
            domain_row = await self._domain_row(principal.pat_domain_id)
        else:
            domain_row = await self._domain_row_by_alias(domain_alias)
        # Unknown domain and "not a member" read the same, so domains cannot be discovered.
        if domain_row is None:
            raise Forbidden("you are not a member of this domain")
        if principal.pat_domain_id is not None and principal.pat_domain_id != domain_row["id"]:
            raise Forbidden("this token is bound to another domain")
        role = await self._role(domain_row["id"], principal.user.id)
        if role is None:
            raise Forbidden("you are not a member of this domain")
        actions = ROLE_ACTIONS[role]
        if principal.pat_actions is not None:
            actions = actions & principal.pat_actions
        caller = Caller(
            user_id=principal.user.id,
            domain_id=str(domain_row["id"]),
            domain_alias=str(domain_row["alias"]),
            actions=actions,
            token_kind=principal.token_kind,
            token_id=principal.token_id,
            models=principal.pat_models,
        )
        return caller, principal.expires_at

    async def _cached(self, key: Any, load: Callable[[], Awaitable[T]]) -> T:
        async def loader() -> tuple[T, None]:
            return await load(), None

        value: T = await self._cache.load(key, loader)
        return value

    async def domain_by_alias(self, alias: str) -> tuple[str, str] | None:
        async def load() -> tuple[str, str] | None:
            row = await self._domain_row_by_alias(alias)
            return None if row is None else (str(row["id"]), str(row["alias"]))

        return await self._cached(("alias", alias), load)

    async def backends(self, domain_id: str) -> list[BackendSpec]:
        async def load() -> list[BackendSpec]:
            return await self.list_backends(domain_id)

        return list(await self._cached(("backends", domain_id), load))

    async def policy(self, domain_id: str) -> bytes | None:
        async def load() -> bytes | None:
            async with self.db.read() as conn:
                text = (
                    await conn.execute(sa.select(domains.c.policy).where(domains.c.id == domain_id))
                ).scalar()
            return None if text is None else str(text).encode()

        return await self._cached(("policy", domain_id), load)

    async def limits(self, domain_id: str) -> DomainLimits:
        async def load() -> DomainLimits:
            row = await self._domain_row(domain_id)
            if row is None:
                return DomainLimits()
            return Domain.from_row(row).limits

        return await self._cached(("limits", domain_id), load)

    async def record_usage(
        self,
        *,
        domain_id: str,
        user_id: str,
        model: str,
        prompt_tokens: int,
        completion_tokens: int,
        requests: int = 1,
    ) -> None:
        await self.records.insert(
            usage,
            {
                "at": _now(),
                "domain_id": domain_id,
                "user_id": user_id,
                "model": storable(model, 200),
                "prompt_tokens": max(0, int(prompt_tokens)),
                "completion_tokens": max(0, int(completion_tokens)),
                "requests": max(0, int(requests)),
            },
        )

    async def record_audit(self, row: AuditRecord) -> None:
        await self.records.insert(audit, audit_values(row))

    async def record_audits(self, rows: list[AuditRecord]) -> None:
        """Many audit rows, committed together (the gateway's batches)."""
        await self.records.insert_many(audit, [audit_values(row) for row in rows])

    def issuer(self) -> TokenSigner:
        return self._signer

    # -- PATs ---------------------------------------------------------------------------------

    async def create_pat(
        self,
        principal: Principal,
        domain_ref: str,
        *,
        name: object = None,
        actions: object = None,
        models: object = None,
        expires_in: object = None,
    ) -> tuple[Pat, str]:
        """A new PAT; returns its metadata and the secret (shown once, never stored)."""
        if principal.token_kind == "pat":  # noqa: S105 - a kind, not a secret
            raise Forbidden("a personal access token cannot create tokens; log in")
        access = await self.domain_access(principal, domain_ref)
        if access.role is None:
            raise Forbidden("only members of the domain can create tokens for it")
        wanted = check_actions(actions if actions is not None else ["inference"])
        _may_create_pat(access.role, wanted, admin=principal.user.is_admin)
        model_list = check_models(models, allow_none=True)
        ttl = self._pat_ttl(expires_in)
        now = _now()
        secret = credentials.new_secret(credentials.PAT_PREFIX)
        pat = Pat(
            id=credentials.new_id(),
            user_id=principal.user.id,
            domain_id=access.domain.id,
            name=check_name(name),
            actions=wanted,
            models=None if model_list is None else frozenset(model_list),
            created_at=now,
            expires_at=None if ttl is None else now + ttl,
            revoked_at=None,
            last_used_at=None,
        )
        try:
            async with self.db.write() as conn:
                # Under the domain's lock, as membership changes: a removal in flight (it
                # revokes the member's tokens) either ends before this check, which then
                # refuses, or waits until this token exists, and then revokes it too.
                await self._lock_domain(conn, access.domain.id)
                # Checked again: the membership or the role may have changed since.
                role = await self._locked_role(conn, access.domain.id, principal.user.id)
                _may_create_pat(role, wanted, admin=principal.user.is_admin)
                await conn.execute(
                    sa.insert(pats).values(
                        id=pat.id,
                        user_id=pat.user_id,
                        domain_id=pat.domain_id,
                        name=pat.name,
                        token_hash=credentials.secret_hash(secret),
                        actions=dump_list(pat.actions),
                        models=None if model_list is None else dump_list(model_list),
                        created_at=now,
                        expires_at=pat.expires_at,
                    )
                )
        except IntegrityError:
            raise NotFound("no such user") from None  # deleted meanwhile
        return pat, secret

    def _pat_ttl(self, expires_in: object) -> int | None:
        limit = self.config.pat_max_ttl
        if expires_in is None:
            return limit
        if isinstance(expires_in, bool) or not isinstance(expires_in, int) or expires_in < 1:
            raise Invalid("expires_in must be a positive number of seconds")
        cap = _PAT_TTL_CEILING if limit is None else min(limit, _PAT_TTL_CEILING)
        if expires_in > cap:
            raise Invalid(f"expires_in must be at most {cap} seconds")
        return expires_in

    async def list_pats(
        self, *, user_id: str | None = None, domain_id: str | None = None
    ) -> list[Pat]:
        query = sa.select(pats).order_by(pats.c.created_at)
        if user_id is not None:
            query = query.where(pats.c.user_id == user_id)
        if domain_id is not None:
            query = query.where(pats.c.domain_id == domain_id)
        async with self.db.read() as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [Pat.from_row(r) for r in rows]

    async def get_pat(self, pat_id: str) -> Pat:
        async with self.db.read() as conn:
            row = (
                (await conn.execute(sa.select(pats).where(pats.c.id == pat_id))).mappings().first()
            )
        if row is None:
            raise NotFound("no such token")
        return Pat.from_row(row)

    async def revoke_pat(self, principal: Principal, pat_id: str) -> Pat:
        """Revoke a PAT: its owner, a member who manages the token's domain, or a platform
        admin may. Anyone else is told it does not exist."""
        pat = await self.get_pat(pat_id)
        if pat.user_id != principal.user.id:
            try:
                access = await self.domain_access(principal, pat.domain_id)
                access.require("manage_members")
            except (NotFound, Forbidden):
                raise NotFound("no such token") from None
        elif principal.pat_domain_id is not None and principal.token_id != pat_id:
            raise Forbidden("a personal access token can only revoke itself")
        async with self.db.write() as conn:
            await conn.execute(
                sa.update(pats)
                .where(pats.c.id == pat_id, pats.c.revoked_at.is_(None))
                .values(revoked_at=_now())
            )
        self._invalidate()
        return await self.get_pat(pat_id)

    # -- domains ------------------------------------------------------------------------------

    async def _domain_row(self, domain_id: str) -> Any:
        async with self.db.read() as conn:
            return (
                (await conn.execute(sa.select(domains).where(domains.c.id == domain_id)))
                .mappings()
                .first()
            )

    async def _domain_row_by_alias(self, alias: str) -> Any:
        async with self.db.read() as conn:
            return (
                (await conn.execute(sa.select(domains).where(domains.c.alias == alias)))
                .mappings()
                .first()
            )

    async def get_domain(self, ref: str) -> Domain:
        """By alias, else by id."""
        row = await self._domain_row_by_alias(ref) or await self._domain_row(ref)
        if row is None:
            raise NotFound("no such domain")
        return Domain.from_row(row)

    async def domain_access(self, principal: Principal, ref: str) -> DomainAccess:
        """What ``principal`` may do in the domain ``ref``. A domain the principal has no
        rights in is NotFound: its existence is not revealed."""
        try:
            domain = await self.get_domain(ref)
        except NotFound:
            raise NotFound("no such domain") from None
        if principal.pat_domain_id is not None and principal.pat_domain_id != domain.id:
            raise NotFound("no such domain")
        role = await self._role(domain.id, principal.user.id)
        actions: frozenset[str] = ROLE_ACTIONS[role] if role is not None else frozenset()
        if principal.pat_actions is not None:
            actions = actions & principal.pat_actions
        elif principal.user.is_admin:
            # Platform admins operate every domain, but read its audit or use its models only
            # as members (which is itself audited).
            actions = actions | _ADMIN_POWERS
        if role is None and not actions:
            raise NotFound("no such domain")
        return DomainAccess(
            domain=domain,
            role=role,
            actions=actions,
            by_token=principal.pat_domain_id is not None,
        )

    async def list_domains(self, principal: Principal) -> list[tuple[Domain, str | None]]:
        """Domains visible to the principal, with its role in each."""
        query = sa.select(domains, members.c.role).select_from(
            domains.outerjoin(
                members,
                sa.and_(
                    members.c.domain_id == domains.c.id, members.c.user_id == principal.user.id
                ),
            )
        )
        if principal.pat_domain_id is not None:
            query = query.where(domains.c.id == principal.pat_domain_id, members.c.role.isnot(None))
        elif not principal.user.is_admin:
            query = query.where(members.c.role.isnot(None))
        async with self.db.read() as conn:
            rows = (await conn.execute(query.order_by(domains.c.alias))).mappings().all()
        return [(Domain.from_row(r), r["role"]) for r in rows]

    async def create_domain(self, *, alias: object, name: object, owner_id: str) -> Domain:
        alias_ = check_alias(alias)
        name_ = check_name(name)
        await self.get_user(owner_id)
        now = _now()
        domain_id = credentials.new_id()
        try:
            async with self.db.write() as conn:
                # Fails for an alias any domain ever had, deleted or not (see issued_aliases).
                await conn.execute(sa.insert(issued_aliases).values(alias=alias_, issued_at=now))
                await conn.execute(
                    sa.insert(domains).values(
                        id=domain_id, alias=alias_, name=name_, created_at=now, updated_at=now
                    )
                )
                await conn.execute(
                    sa.insert(members).values(
                        domain_id=domain_id, user_id=owner_id, role="owner", created_at=now
                    )
                )
        except IntegrityError as exc:
            if _foreign_key_violation(exc):
                raise NotFound("no such user") from None  # the owner was deleted meanwhile
            raise Conflict(
                "a domain with this alias exists or existed (an alias is never given out again: "
                "agents configured for it would accept the new domain's tokens)"
            ) from exc
        self._invalidate()
        return await self.get_domain(domain_id)

    async def update_domain(self, domain_id: str, *, name: object) -> Domain:
        async with self.db.write() as conn:
            await conn.execute(
                sa.update(domains)
                .where(domains.c.id == domain_id)
                .values(name=check_name(name), updated_at=_now())
            )
        self._invalidate()
        return await self.get_domain(domain_id)

    async def delete_domain(self, domain_id: str) -> None:
        async with self.db.write() as conn:
            await conn.execute(sa.delete(domains).where(domains.c.id == domain_id))
        self._invalidate()

    async def get_policy(self, domain_id: str) -> dict[str, Any] | None:
        raw = await self.policy(domain_id)
        if raw is None:
            return None
        value: dict[str, Any] = json.loads(raw)
        return value

    async def set_policy(self, domain_id: str, document: object) -> dict[str, Any] | None:
        """Validate (``cube-policy/1``, strict) and store the domain's policy; None clears."""
        text = None
        if document is not None:
            try:
                Policy.from_json(document)
            except AttestationError as exc:
                raise Invalid(f"invalid policy: {exc}", code="invalid_policy") from exc
            text = json.dumps(document, sort_keys=True, separators=(",", ":"))
        async with self.db.write() as conn:
            await conn.execute(
                sa.update(domains)
                .where(domains.c.id == domain_id)
                .values(policy=text, updated_at=_now())
            )
        self._invalidate()
        return None if text is None else dict(json.loads(text))

    async def set_limits(
        self, domain_id: str, values: dict[str, object], *, replace: bool
    ) -> DomainLimits:
        names = (
            "requests_per_minute",
            "tokens_per_minute",
            "token_requests_per_minute",
            "token_tokens_per_minute",
        )
        unknown = set(values) - set(names)
        if unknown:
            raise Invalid(f"unknown limits: {', '.join(sorted(unknown))}")
        update = {n: check_limit(values.get(n), n) for n in names if replace or n in values}
        if update:
            async with self.db.write() as conn:
                await conn.execute(
                    sa.update(domains)
                    .where(domains.c.id == domain_id)
                    .values(**update, updated_at=_now())
                )
        self._invalidate()
        return (await self.get_domain(domain_id)).limits

    # -- members ------------------------------------------------------------------------------

    async def list_members(self, domain_id: str) -> list[Member]:
        async with self.db.read() as conn:
            rows = (
                (
                    await conn.execute(
                        sa.select(members, users.c.email, users.c.name)
                        .select_from(members.join(users))
                        .where(members.c.domain_id == domain_id)
                        .order_by(users.c.email)
                    )
                )
                .mappings()
                .all()
            )
        return [
            Member(r["domain_id"], r["user_id"], r["email"], r["name"], r["role"], r["created_at"])
            for r in rows
        ]

    async def get_member(self, domain_id: str, user_id: str) -> Member:
        for member in await self.list_members(domain_id):
            if member.user_id == user_id:
                return member
        raise NotFound("no such member")

    async def set_member(
        self,
        access: DomainAccess,
        *,
        user_id: str,
        role: object,
        platform_admin: bool,
        adding: bool = False,
    ) -> Member:
        """Add a member (``adding``: Conflict if already one) or change a member's role."""
        role_ = check_role(role)
        access.require("manage_members")
        _within_token_rights(access, role_, "grant")
        may_own = access.is_owner or platform_admin
        domain_id = access.domain.id
        await self.get_user(user_id)
        now = _now()
        try:
            async with self.db.write() as conn:
                await self._lock_domain(conn, domain_id)
                current = await self._locked_role(conn, domain_id, user_id)
                if current is not None:
                    _within_token_rights(access, current, "change the role of")
                if (role_ == "owner" or current == "owner") and not may_own:
                    raise Forbidden(
                        "only an owner (logged in, not with a token) or a platform "
                        "administrator can grant or change the owner role"
                    )
                if adding and current is not None:
                    raise Conflict(
                        f"already a member of this domain, as {current} (change the role "
                        "with PUT .../members/{user_id})"
                    )
                if current == "owner" and role_ != "owner":
                    await self._keep_an_owner(conn, domain_id, user_id)
                if current is None:
                    await conn.execute(
                        sa.insert(members).values(
                            domain_id=domain_id, user_id=user_id, role=role_, created_at=now
                        )
                    )
                elif current != role_:
                    await conn.execute(
                        sa.update(members)
                        .where(members.c.domain_id == domain_id, members.c.user_id == user_id)
                        .values(role=role_)
                    )
        except IntegrityError:
            raise NotFound("no such user") from None  # deleted meanwhile
        self._invalidate()
        return await self.get_member(domain_id, user_id)

    async def _lock_domain(self, conn: Any, domain_id: str) -> None:
        """Serialise the membership changes of one domain on its row: two owners demoting
        themselves at once, or two adds of one user, wait for each other instead of
        deadlocking or failing on the primary key (PostgreSQL; SQLite writes one at a time).
        NotFound if the domain is gone (deleted meanwhile, maybe through another replica)."""
        found = (
            await conn.execute(
                sa.select(domains.c.id).where(domains.c.id == domain_id).with_for_update()
            )
        ).first()
        if found is None:
            raise NotFound("no such domain")

    async def _locked_role(self, conn: Any, domain_id: str, user_id: str) -> str | None:
        """``user_id``'s role in ``domain_id``, its membership row locked (None: no member)."""
        role = (
            await conn.execute(
                sa.select(members.c.role)
                .where(members.c.domain_id == domain_id, members.c.user_id == user_id)
                .with_for_update()
            )
        ).scalar()
        return None if role is None else str(role)

    async def _keep_an_owner(
        self,
        conn: Any,
        domain_id: str,
        user_id: str,
        message: str = "a domain must keep at least one owner",
    ) -> None:
        owners = (
            await conn.execute(
                sa.select(members.c.user_id)
                .where(members.c.domain_id == domain_id, members.c.role == "owner")
                .order_by(members.c.user_id)
                .with_for_update()
            )
        ).all()
        if not [o for o in owners if o[0] != user_id]:
            raise Conflict(message)

    async def remove_member(
        self, access: DomainAccess, *, user_id: str, platform_admin: bool
    ) -> None:
        access.require("manage_members")
        domain_id = access.domain.id
        async with self.db.write() as conn:
            await self._lock_domain(conn, domain_id)
            current = await self._locked_role(conn, domain_id, user_id)
            if current is None:
                raise NotFound("no such member")
            _within_token_rights(access, current, "remove")
            if current == "owner":
                if not (access.is_owner or platform_admin):
                    raise Forbidden(
                        "only an owner (logged in, not with a token) or a platform "
                        "administrator can remove an owner"
                    )
                await self._keep_an_owner(conn, domain_id, user_id)
            await conn.execute(
                sa.delete(members).where(
                    members.c.domain_id == domain_id, members.c.user_id == user_id
                )
            )
            # The member's tokens for this domain die with the membership.
            await conn.execute(
                sa.update(pats)
                .where(
                    pats.c.domain_id == domain_id,
                    pats.c.user_id == user_id,
                    pats.c.revoked_at.is_(None),
                )
                .values(revoked_at=_now())
            )
        self._invalidate()

    # -- backends -----------------------------------------------------------------------------

    @staticmethod
    def _backend(row: Any) -> BackendSpec:
        return BackendSpec(
            id=row["id"],
            domain_id=row["domain_id"],
            url=row["url"],
            kind=check_kind(row["kind"]),
            models=tuple(load_list(row["models"])),
            enabled=bool(row["enabled"]),
        )

    async def backend_domains(self) -> list[str]:
        """The ids of the domains with at least one enabled backend (not cached: read every
        ``health_interval`` by the gateway's agent discovery)."""
        async with self.db.read() as conn:
            rows = await conn.execute(
                sa.select(backends.c.domain_id)
                .where(backends.c.enabled)
                .distinct()
                .order_by(backends.c.domain_id)
            )
            return [str(r[0]) for r in rows]

    async def list_backends(self, domain_id: str) -> list[BackendSpec]:
        async with self.db.read() as conn:
            rows = (
                (
                    await conn.execute(
                        sa.select(backends)
                        .where(backends.c.domain_id == domain_id)
                        .order_by(backends.c.created_at, backends.c.id)
                    )
                )
                .mappings()
                .all()
            )
        return [self._backend(r) for r in rows]

    async def get_backend(self, domain_id: str, backend_id: str) -> BackendSpec:
        async with self.db.read() as conn:
            row = (
                (
                    await conn.execute(
                        sa.select(backends).where(
                            backends.c.id == backend_id, backends.c.domain_id == domain_id
                        )
                    )
                )
                .mappings()
                .first()
            )
        if row is None:
            raise NotFound("no such backend")
        return self._backend(row)

    async def add_backend(
        self,
        domain_id: str,
        *,
        url: object,
        kind: object,
        models: object,
        enabled: object = True,
    ) -> BackendSpec:
        if not isinstance(enabled, bool):
            raise Invalid("enabled must be true or false")
        model_list = check_models(models if models is not None else [], allow_none=False)
        assert model_list is not None
        now = _now()
        spec = BackendSpec(
            id=credentials.new_id(),
            domain_id=domain_id,
            url=check_backend_url(url),
            kind=check_kind(kind),
            models=model_list,
            enabled=enabled,
        )
        try:
            async with self.db.write() as conn:
                await conn.execute(
                    sa.insert(backends).values(
                        id=spec.id,
                        domain_id=domain_id,
                        url=spec.url,
                        kind=spec.kind,
                        models=dump_list(spec.models),
                        enabled=spec.enabled,
                        created_at=now,
                        updated_at=now,
                    )
                )
        except IntegrityError as exc:
            raise Conflict(_BACKEND_URL_TAKEN) from exc
        self._invalidate()
        return spec

    async def update_backend(
        self, domain_id: str, backend_id: str, changes: dict[str, object]
    ) -> BackendSpec:
        await self.get_backend(domain_id, backend_id)  # NotFound first: reveals nothing else
        unknown = set(changes) - {"url", "kind", "models", "enabled"}
        if unknown:
            raise Invalid(f"unknown fields: {', '.join(sorted(unknown))}")
        values: dict[str, Any] = {}
        if "url" in changes:
            values["url"] = check_backend_url(changes["url"])
        if "kind" in changes:
            values["kind"] = check_kind(changes["kind"])
        if "models" in changes:
            model_list = check_models(changes["models"], allow_none=False)
            assert model_list is not None
            values["models"] = dump_list(model_list)
        if "enabled" in changes:
            if not isinstance(changes["enabled"], bool):
                raise Invalid("enabled must be true or false")
            values["enabled"] = changes["enabled"]
        try:
            async with self.db.write() as conn:
                done = await conn.execute(
                    sa.update(backends)
                    .where(backends.c.id == backend_id, backends.c.domain_id == domain_id)
                    .values(**values, updated_at=_now())
                )
                if done.rowcount == 0:
                    raise NotFound("no such backend")
        except IntegrityError as exc:
            raise Conflict(_BACKEND_URL_TAKEN) from exc
        self._invalidate()
        return await self.get_backend(domain_id, backend_id)

    async def remove_backend(self, domain_id: str, backend_id: str) -> None:
        async with self.db.write() as conn:
            done = await conn.execute(
                sa.delete(backends).where(
                    backends.c.id == backend_id, backends.c.domain_id == domain_id
                )
            )
            if done.rowcount == 0:
                raise NotFound("no such backend")
        self._invalidate()


def as_directory(identity: Identity) -> Directory:
    """``identity`` as the gateway's :class:`Directory` (mypy checks the protocol here)."""
    return identity
