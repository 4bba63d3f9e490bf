"""Identity: users, passwords, sessions, signing keys and JWKS, PATs, domains and members.

``Identity`` (the database-backed :class:`proxy.directory.Directory`) is opened by
``identity_ctx(config)`` and found at ``app[IDENTITY]``.
"""

from proxy.identity.app import IDENTITY, identity_ctx
from proxy.identity.config import IdentityConfig, OidcConfig
from proxy.identity.errors import (
    Conflict,
    Forbidden,
    IdentityError,
    Invalid,
    NotFound,
    TooManyAttempts,
    Unauthorized,
)
from proxy.identity.keys import ACCESS_AUDIENCE, ForwardSigner, KeyRing
from proxy.identity.models import Domain, Member, Pat, Principal, TokenPair, User
from proxy.identity.passwords import PasswordHashing
from proxy.identity.service import DomainAccess, Identity, StartupError

__all__ = [
    "ACCESS_AUDIENCE",
    "IDENTITY",
    "Conflict",
    "Domain",
    "DomainAccess",
    "Forbidden",
    "ForwardSigner",
    "Identity",
    "IdentityConfig",
    "IdentityError",
    "Invalid",
    "KeyRing",
    "Member",
    "NotFound",
    "OidcConfig",
    "PasswordHashing",
    "Pat",
    "Principal",
    "StartupError",
    "TokenPair",
    "TooManyAttempts",
    "Unauthorized",
    "User",
    "identity_ctx",
]
