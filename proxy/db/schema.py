"""The proxy's tables, as of the latest migration (see :mod:`proxy.db.migrations`).

Identifiers are random hex strings (never sequential, so one tenant cannot count another's
objects); timestamps are UNIX seconds (float) in UTC. Secrets are never stored: tokens as
SHA-256 hex of the token, passwords as argon2id/scrypt hashes. Signing keys are the exception
(the proxy must sign): see :mod:`proxy.identity.keys` for how they are protected.

Changing a table here means adding a migration that brings an existing database to the same
shape; tests/proxy/test_db.py checks that a migrated database matches these definitions.
"""

from __future__ import annotations

import sqlalchemy as sa

__all__ = [
    "audit",
    "backends",
    "domains",
    "issued_aliases",
    "login_attempts",
    "members",
    "metadata",
    "passwords",
    "pats",
    "rate_buckets",
    "refresh_tokens",
    "schema_version",
    "sessions",
    "signing_keys",
    "usage",
    "users",
]

metadata = sa.MetaData()

_ID = 32  # uuid4().hex
# An auto-increment key that is an INTEGER PRIMARY KEY (rowid) on SQLite and BIGINT elsewhere.
_SERIAL = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _ts(name: str, *, nullable: bool = False) -> sa.Column[float]:
    return sa.Column(name, sa.Double(), nullable=nullable)


schema_version = sa.Table(
    "schema_version",
    metadata,
    sa.Column("version", sa.Integer(), primary_key=True, autoincrement=False),
    _ts("applied_at"),
)

users = sa.Table(
    "users",
    metadata,
    sa.Column("id", sa.String(_ID), primary_key=True),
    # Stored lower-cased; unique.
    sa.Column("email", sa.String(320), nullable=False, unique=True),
    sa.Column("name", sa.String(200), nullable=False, server_default=""),
    # A platform administrator (users, domains, keys); domain rights come from members.
    sa.Column("is_admin", sa.Boolean(), nullable=False, server_default=sa.false()),
    sa.Column("disabled", sa.Boolean(), nullable=False, server_default=sa.false()),
    _ts("created_at"),
    _ts("updated_at"),
)

# Kept apart from users so that no query listing users can ever carry a hash. No row = no
# password login (e.g. a user who signs in through the external OIDC issuer only).
passwords = sa.Table(
    "passwords",
    metadata,
    sa.Column(
        "user_id", sa.String(_ID), sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    ),
    sa.Column("hash", sa.String(512), nullable=False),  # argon2id, PHC string format
    _ts("updated_at"),
)

# A login session: one refresh-token family. Access tokens name it (claim "sid"), so revoking
# the session (logout, reuse of a rotated refresh token, disabling the user) ends them too.
sessions = sa.Table(
    "sessions",
    metadata,
    sa.Column("id", sa.String(_ID), primary_key=True),
    sa.Column(
        "user_id", sa.String(_ID), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False
    ),
    _ts("created_at"),
    _ts("expires_at"),  # absolute end: refresh cannot extend past it
    _ts("revoked_at", nullable=True),
    sa.Column("revoked_reason", sa.String(64), nullable=True),
    sa.Index("ix_sessions_user", "user_id"),
)

refresh_tokens = sa.Table(
    "refresh_tokens",
    metadata,
    sa.Column("id", sa.String(_ID), primary_key=True),
    sa.Column(
        "session_id",
        sa.String(_ID),
        sa.ForeignKey("sessions.id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),  # SHA-256 hex
    _ts("created_at"),
    _ts("expires_at"),
    _ts("used_at", nullable=True),  # set when rotated; presenting it again = reuse
    sa.Index("ix_refresh_session", "session_id"),
)

# Every alias a domain ever had, never deleted: an agent is configured with its domain's alias
# (the audience of the tokens it accepts), so a new domain taking a deleted one's alias could
# reach the old domain's agents still running (migration 6).
issued_aliases = sa.Table(
    "issued_aliases",
    metadata,
    sa.Column("alias", sa.String(63), primary_key=True),
    _ts("issued_at"),
)

domains = sa.Table(
    "domains",
    metadata,
    sa.Column("id", sa.String(_ID), primary_key=True),
    sa.Column("alias", sa.String(63), nullable=False, unique=True),
    sa.Column("name", sa.String(200), nullable=False, server_default=""),
    # The cube-policy/1 document (validated before it is stored); NULL = none set.
    sa.Column("policy", sa.Text(), nullable=True),
    sa.Column("requests_per_minute", sa.Integer(), nullable=True),
    sa.Column("tokens_per_minute", sa.Integer(), nullable=True),
    sa.Column("token_requests_per_minute", sa.Integer(), nullable=True),
    sa.Column("token_tokens_per_minute", sa.Integer(), nullable=True),
    _ts("created_at"),
    _ts("updated_at"),
)

members = sa.Table(
    "members",
    metadata,
    sa.Column(
        "domain_id",
        sa.String(_ID),
        sa.ForeignKey("domains.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column(
        "user_id", sa.String(_ID), sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    ),
    sa.Column("role", sa.String(16), nullable=False),
    _ts("created_at"),
    sa.Index("ix_members_user", "user_id"),
)

pats = sa.Table(
    "pats",
    metadata,
    sa.Column("id", sa.String(_ID), primary_key=True),
    sa.Column(
        "user_id", sa.String(_ID), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column(
        "domain_id",
        sa.String(_ID),
        sa.ForeignKey("domains.id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("name", sa.String(200), nullable=False, server_default=""),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),  # SHA-256 hex
    sa.Column("actions", sa.Text(), nullable=False),  # JSON list
    sa.Column("models", sa.Text(), nullable=True),  # JSON list; NULL = any model
    _ts("created_at"),
    _ts("expires_at", nullable=True),
    _ts("revoked_at", nullable=True),
    _ts("last_used_at", nullable=True),
    sa.Index("ix_pats_user", "user_id"),
    sa.Index("ix_pats_domain", "domain_id"),
)

backends = sa.Table(
    "backends",
    metadata,
    sa.Column("id", sa.String(_ID), primary_key=True),
    sa.Column(
        "domain_id",
        sa.String(_ID),
        sa.ForeignKey("domains.id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("url", sa.String(2048), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("models", sa.Text(), nullable=False),  # JSON list
    sa.Column("enabled", sa.Boolean(), nullable=False, server_default=sa.true()),
    _ts("created_at"),
    _ts("updated_at"),
    sa.UniqueConstraint("domain_id", "url", name="uq_backends_domain_url"),
    # An agent serves one domain (its tokens' audience): its URL is one domain's backend only,
    # or another tenant could register it and spend its evidence rate on it (migration 5).
    sa.Index("uq_backends_url", "url", unique=True),
)

signing_keys = sa.Table(
    "signing_keys",
    metadata,
    sa.Column("kid", sa.String(64), primary_key=True),
    sa.Column("alg", sa.String(16), nullable=False),
    # PKCS#8 PEM, or "enc:v1:<base64>" (AES-256-GCM under the key-encryption secret).
    sa.Column("private_key", sa.Text(), nullable=False),
    sa.Column("public_jwk", sa.Text(), nullable=False),
    _ts("created_at"),
    # Set when a newer key replaced it: tokens are no longer signed with it...
    _ts("retired_at", nullable=True),
    # ...and from this time no token it signed can still be valid: it leaves the JWKS.
    _ts("expires_at", nullable=True),
)

usage = sa.Table(
    "usage",
    metadata,
    sa.Column("id", _SERIAL, primary_key=True, autoincrement=True),
    _ts("at"),
    sa.Column("domain_id", sa.String(_ID), nullable=False),
    sa.Column("user_id", sa.String(_ID), nullable=False),
    sa.Column("model", sa.String(200), nullable=False),
    # 64-bit: an agent's counts are not trusted to stay under 2**31 (migration 7).
    sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
    sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
    # How many requests the row sums (the gateway writes one row per user and model per batch).
    sa.Column("requests", sa.Integer(), nullable=False, server_default="1"),
    sa.Index("ix_usage_domain_at", "domain_id", "at"),
)

# Audit rows outlive the objects they name (no foreign keys): deleting a domain or a user
# does not erase what they did.
audit = sa.Table(
    "audit",
    metadata,
    sa.Column("id", _SERIAL, primary_key=True, autoincrement=True),
    _ts("at"),
    sa.Column("domain_id", sa.String(_ID), nullable=False),
    sa.Column("user_id", sa.String(_ID), nullable=True),
    sa.Column("token_id", sa.String(_ID), nullable=True),
    sa.Column("event", sa.String(64), nullable=False),
    sa.Column("route", sa.String(512), nullable=False),
    sa.Column("status", sa.Integer(), nullable=False),
    sa.Column("model", sa.String(200), nullable=True),
    sa.Column("prompt_tokens", sa.BigInteger(), nullable=True),
    sa.Column("completion_tokens", sa.BigInteger(), nullable=True),
    sa.Column("latency_ms", sa.Double(), nullable=True),
    sa.Column("evidence_digest", sa.String(80), nullable=True),
    sa.Column("backend_id", sa.String(_ID), nullable=True),
    sa.Column("detail", sa.String(1000), nullable=True),
    sa.Column("extra", sa.Text(), nullable=True),  # JSON object
    sa.Index("ix_audit_domain_id", "domain_id", "id"),
)

# Rate-limit buckets shared by proxy replicas (PostgreSQL; see proxy.db.ratelimits). A key
# names a limit and whom it applies to (ids, never a secret); levels are in units (requests or
# tokens), times in the database's clock.
rate_buckets = sa.Table(
    "rate_buckets",
    metadata,
    sa.Column("key", sa.String(200), primary_key=True),
    sa.Column("lim", sa.BigInteger(), nullable=False),
    sa.Column("level", sa.Double(), nullable=False),
    _ts("updated"),
)

# Login attempts per account, counted before the password is checked, so that every worker and
# replica together allow ``login_max_failures`` per window (and concurrent guesses cannot all
# slip past the count). Keyed by the SHA-256 of the normalised email: an address that is not an
# account is not stored in clear.
login_attempts = sa.Table(
    "login_attempts",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("attempts", sa.Integer(), nullable=False),
    _ts("window_start"),
)
