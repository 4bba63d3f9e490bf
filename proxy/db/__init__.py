"""The proxy's storage: one async data layer over SQLite and PostgreSQL, with migrations."""

from proxy.db.engine import Database, DatabaseError, Dialect, database_url, redacted_url
from proxy.db.migrations import LATEST, MIGRATIONS, current_version, migrate

__all__ = [
    "LATEST",
    "MIGRATIONS",
    "Database",
    "DatabaseError",
    "Dialect",
    "current_version",
    "database_url",
    "migrate",
    "redacted_url",
]
