"""Users: CRUD, password hashing (argon2id, off the event loop), the admin bootstrap."""

from __future__ import annotations

import asyncio
import threading
import time
import unicodedata
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from proxy.db.schema import passwords, users
from proxy.identity import (
    Conflict,
    Identity,
    IdentityConfig,
    Invalid,
    NotFound,
    PasswordHashing,
    StartupError,
    Unauthorized,
)
from proxy.identity.config import ADMIN_EMAIL_ENV, ADMIN_PASSWORD_ENV
from proxy.identity.passwords import check_password_rules
from tests.proxy.conftest import (
    ADMIN_EMAIL,
    ADMIN_PASSWORD,
    dump_database,
    identity_config,
    run,
    use_identity,
)

PASSWORD = "user-password-5678"


# -- bootstrap -----------------------------------------------------------------------------------


def test_admin_is_bootstrapped_from_the_configuration(database: str) -> None:
    async def body(identity: Identity) -> None:
        admin = await identity.find_user(ADMIN_EMAIL)
        assert admin is not None and admin.is_admin and not admin.disabled
        pair = await identity.login(ADMIN_EMAIL, ADMIN_PASSWORD)
        assert pair.access_token
        assert len(await identity.list_users()) == 1

    use_identity(database, body)


def test_bootstrap_never_overwrites_an_existing_account(database: str) -> None:
    use_identity(database, _noop)
    # A second start with another password in the environment changes nothing.

    async def body(identity: Identity) -> None:
        await identity.login(ADMIN_EMAIL, ADMIN_PASSWORD)
        with pytest.raises(Unauthorized):
            await identity.login(ADMIN_EMAIL, "a-different-password-99")
        assert len(await identity.list_users()) == 1

    use_identity(database, body, admin_password="a-different-password-99")


def test_bootstrap_adds_no_second_admin(database: str) -> None:
    use_identity(database, _noop)

    async def body(identity: Identity) -> None:
        assert await identity.find_user("other@cube.test") is None
        assert len(await identity.list_users()) == 1

    use_identity(database, body, admin_email="other@cube.test")


async def _noop(identity: Identity) -> None:
    del identity


def test_an_empty_database_without_bootstrap_refuses_to_start(database: str) -> None:
    with pytest.raises(StartupError, match=ADMIN_EMAIL_ENV):
        use_identity(database, _noop, admin_email=None, admin_password=None)


def test_a_populated_database_starts_without_bootstrap(database: str) -> None:
    use_identity(database, _noop)

    async def body(identity: Identity) -> None:
        assert (await identity.find_user(ADMIN_EMAIL)) is not None

    use_identity(database, body, admin_email=None, admin_password=None)


@pytest.mark.parametrize(
    ("email", "password", "message"),
    [
        (ADMIN_EMAIL, None, "both"),
        (None, ADMIN_PASSWORD, "both"),
        (ADMIN_EMAIL, "short", "at least"),
        ("not-an-email", ADMIN_PASSWORD, "email"),
    ],
)
def test_bad_bootstrap_settings_refuse_to_start(
    tmp_path: Any, email: str | None, password: str | None, message: str
) -> None:
    with pytest.raises(StartupError, match=message):
        use_identity(str(tmp_path / "p.db"), _noop, admin_email=email, admin_password=password)


def test_bootstrap_variables_come_from_the_environment() -> None:
    config = IdentityConfig(database="x.db", issuer_url="https://p.test").with_env(
        {ADMIN_EMAIL_ENV: "root@cube.test", ADMIN_PASSWORD_ENV: "from-the-env-123"}
    )
    assert config.admin_email == "root@cube.test"
    assert config.admin_password == "from-the-env-123"
    assert "from-the-env-123" not in repr(config)
    bare = IdentityConfig(database="x.db", issuer_url="https://p.test").with_env({})
    assert bare.admin_email is None and bare.admin_password is None


# -- CRUD ----------------------------------------------------------------------------------------


def test_user_crud(database: str) -> None:
    async def body(identity: Identity) -> None:
        user = await identity.create_user(email=" Alice@Example.COM ", password=PASSWORD, name="A")
        assert user.email == "alice@example.com" and user.name == "A" and not user.is_admin
        assert (await identity.get_user(user.id)).email == "alice@example.com"
        assert (await identity.find_user("ALICE@example.com")) == user
        emails = [u.email for u in await identity.list_users()]
        assert emails == sorted([ADMIN_EMAIL, "alice@example.com"])

        updated = await identity.update_user(user.id, name="Alice", email="alice2@example.com")
        assert updated.name == "Alice" and updated.email == "alice2@example.com"
        assert updated.updated_at >= user.updated_at
        await identity.login("alice2@example.com", PASSWORD)

        await identity.delete_user(user.id)
        with pytest.raises(NotFound):
            await identity.get_user(user.id)
        with pytest.raises(NotFound):
            await identity.delete_user(user.id)
        with pytest.raises(Unauthorized):
            await identity.login("alice2@example.com", PASSWORD)

    use_identity(database, body)


def test_email_is_unique_whatever_its_case(database: str) -> None:
    async def body(identity: Identity) -> None:
        first = await identity.create_user(email="bob@example.com", password=PASSWORD)
        with pytest.raises(Conflict):
            await identity.create_user(email="BOB@example.com", password=PASSWORD)
        other = await identity.create_user(email="carol@example.com", password=PASSWORD)
        with pytest.raises(Conflict):
            await identity.update_user(other.id, email="Bob@Example.com")
        assert (await identity.find_user("bob@example.com")) == first

    use_identity(database, body)


@pytest.mark.parametrize(
    "fields",
    [
        {"email": "no-at-sign", "password": PASSWORD},
        {"email": 42, "password": PASSWORD},
        {"email": "a@b.test", "password": "short"},
        {"email": "a@b.test", "password": "x" * 2000},
        {"email": "a@b.test", "password": 12345678901234},
        {"email": "a@b.test", "password": PASSWORD, "name": "bad\nname"},
    ],
)
def test_invalid_users_are_refused(tmp_path: Any, fields: dict[str, Any]) -> None:
    async def body(identity: Identity) -> None:
        with pytest.raises(Invalid):
            await identity.create_user(**fields)
        assert len(await identity.list_users()) == 1

    use_identity(str(tmp_path / "p.db"), body)


def test_disable_and_enable(database: str) -> None:
    async def body(identity: Identity) -> None:
        user = await identity.create_user(email="dave@example.com", password=PASSWORD)
        pair = await identity.login("dave@example.com", PASSWORD)
        await identity.authenticate_principal(pair.access_token)
        await identity.update_user(user.id, disabled=True)
        with pytest.raises(Unauthorized):
            await identity.authenticate_principal(pair.access_token)
        with pytest.raises(Unauthorized):
            await identity.refresh(pair.refresh_token)
        with pytest.raises(Unauthorized):
            await identity.login("dave@example.com", PASSWORD)
        await identity.update_user(user.id, disabled=False)
        # The old session stays revoked; a new login works.
        with pytest.raises(Unauthorized):
            await identity.authenticate_principal(pair.access_token)
        again = await identity.login("dave@example.com", PASSWORD)
        assert (await identity.authenticate_principal(again.access_token)).user.id == user.id

    use_identity(database, body)


def test_password_change_ends_sessions(database: str) -> None:
    async def body(identity: Identity) -> None:
        user = await identity.create_user(email="erin@example.com", password=PASSWORD)
        pair = await identity.login("erin@example.com", PASSWORD)
        await identity.update_user(user.id, password="a-new-password-000")
        with pytest.raises(Unauthorized):
            await identity.authenticate_principal(pair.access_token)
        with pytest.raises(Unauthorized):
            await identity.login("erin@example.com", PASSWORD)
        await identity.login("erin@example.com", "a-new-password-000")

    use_identity(database, body)


def test_the_last_platform_admin_cannot_be_removed(database: str) -> None:
    async def body(identity: Identity) -> None:
        admin = await identity.find_user(ADMIN_EMAIL)
        assert admin is not None
        for change in ({"disabled": True}, {"is_admin": False}):
            with pytest.raises(Conflict, match="last"):
                await identity.update_user(admin.id, **change)
        with pytest.raises(Conflict, match="last"):
            await identity.delete_user(admin.id)
        second = await identity.create_user(
            email="root2@example.com", password=PASSWORD, is_admin=True
        )
        await identity.update_user(admin.id, is_admin=False)  # another admin remains
        with pytest.raises(Conflict):
            await identity.delete_user(second.id)

    use_identity(database, body)


# -- password storage ----------------------------------------------------------------------------


def test_passwords_are_stored_as_argon2id_only(database: str) -> None:
    async def body(identity: Identity) -> None:
        user = await identity.create_user(email="frank@example.com", password=PASSWORD)
        async with identity.db.read() as conn:
            stored = (
                await conn.execute(
                    sa.select(passwords.c.hash).where(passwords.c.user_id == user.id)
                )
            ).scalar()
            columns = {c.name for c in users.columns}
        assert str(stored).startswith("$argon2id$")
        assert not {"password", "password_hash", "hash"} & columns
        everything = await dump_database(identity.db)
        assert PASSWORD not in everything and ADMIN_PASSWORD not in everything

    use_identity(database, body)


def test_default_argon2_parameters_are_owasps() -> None:
    hashing = PasswordHashing()
    encoded = run(hashing.hash(PASSWORD))
    assert encoded.startswith("$argon2id$v=19$m=65536,t=3,p=4$")
    assert run(hashing.verify(encoded, PASSWORD)) == (True, False)
    assert run(hashing.verify(encoded, PASSWORD + "x")) == (False, False)
    assert run(hashing.verify("garbage", PASSWORD)) == (False, False)
    assert run(hashing.verify(None, PASSWORD)) == (False, False)
    with pytest.raises(ValueError, match="minimum"):
        PasswordHashing(memory_kib=1024)


def test_hashing_does_not_block_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Full-strength hashes run in worker threads: the loop keeps running meanwhile."""
    hashing = PasswordHashing()
    threads: set[int] = set()
    original = hashing._hash_sync

    def recording(password: str) -> str:
        threads.add(threading.get_ident())
        return original(password)

    monkeypatch.setattr(hashing, "_hash_sync", recording)

    async def body() -> tuple[int, float, int]:
        ticks = 0
        done = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not done.is_set():
                await asyncio.sleep(0.005)
                ticks += 1

        task = asyncio.create_task(ticker())
        started = time.monotonic()
        await asyncio.gather(*(hashing.hash(PASSWORD) for _ in range(4)))
        elapsed = time.monotonic() - started
        done.set()
        await task
        return ticks, elapsed, threading.get_ident()

    ticks, elapsed, loop_thread = run(body())
    assert elapsed > 0.05  # the hashes really took time...
    assert loop_thread not in threads and threads  # ...in other threads...
    assert ticks >= 5  # ...while the loop kept ticking (a blocked loop ticks ~once per hash)


def test_a_weaker_hash_is_upgraded_at_login(tmp_path: Any) -> None:
    database = str(tmp_path / "p.db")

    async def weak(identity: Identity) -> None:
        await identity.create_user(email="gina@example.com", password=PASSWORD)

    use_identity(database, weak)  # argon2 with the tests' cheap parameters

    async def strong(identity: Identity) -> None:
        await identity.login("gina@example.com", PASSWORD)
        user = await identity.find_user("gina@example.com")
        assert user is not None
        assert (await identity.password_hash(user.id) or "").startswith(
            "$argon2id$v=19$m=16384,t=2,p=1$"
        )

    use_identity(
        database, strong, argon2_memory_kib=16384, argon2_time_cost=2, argon2_parallelism=1
    )


def test_login_errors_do_not_tell_which_part_was_wrong(database: str) -> None:
    async def body(identity: Identity) -> None:
        await identity.create_user(email="hal@example.com", password=PASSWORD)
        messages = set()
        for email, password in (
            ("hal@example.com", "wrong-password-123"),
            ("nobody@example.com", PASSWORD),
        ):
            with pytest.raises(Unauthorized) as caught:
                await identity.login(email, password)
            messages.add(caught.value.message)
        assert messages == {"invalid email or password"}

    use_identity(database, body)


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="issuer_url"):
        identity_config("x.db", issuer_url="ftp://x")
    with pytest.raises(ValueError, match="positive"):
        identity_config("x.db", access_token_ttl=0)


def test_a_url_option_the_driver_refuses_is_a_startup_error_without_the_password() -> None:
    """``?sslmode=require`` (libpq's spelling; asyncpg takes ``ssl=``) made asyncpg raise a
    TypeError that came out of cube-proxy as a traceback."""
    database = "postgresql://cube:hunter2-secret@127.0.0.1:1/cube?sslmode=require"
    with pytest.raises(StartupError, match="driver refused an option") as refused:
        use_identity(database, _noop)
    assert "hunter2-secret" not in str(refused.value)
    assert "ssl=require" in str(refused.value)


def test_replicas_starting_together_on_an_empty_database_both_start(database: str) -> None:
    """One bootstraps the administrator and the first signing key; the other finds them (it
    crashed with a Conflict traceback, and on PostgreSQL both added a first key)."""

    async def main() -> tuple[list[BaseException], list[str]]:
        opened = await asyncio.gather(
            Identity.open(identity_config(database)),
            Identity.open(identity_config(database)),
            return_exceptions=True,
        )
        failures = [r for r in opened if isinstance(r, BaseException)]
        active: list[str] = []
        for identity in opened:
            if isinstance(identity, Identity):
                active = [k["kid"] for k in identity.keys.kids() if k["retired_at"] is None]
                await identity.close()
        return failures, active

    failures, active = run(main())
    assert failures == []
    assert len(active) == 1  # one signing key in use, not one per replica


def test_a_password_is_the_same_whichever_unicode_form_it_is_typed_in(tmp_path: Path) -> None:
    """Set with a composed "é", typed decomposed (as some input methods send it): the same
    password (it was refused, locking the user out with no reason they could see)."""
    composed = "café-crème-brûlée"
    decomposed = unicodedata.normalize("NFD", composed)
    assert composed != decomposed

    async def body(identity: Identity) -> None:
        await identity.create_user(email="eve@example.com", password=composed)
        await identity.login("eve@example.com", decomposed)
        await identity.login("eve@example.com", composed)
        with pytest.raises(Unauthorized):
            await identity.login("eve@example.com", "cafe-creme-brulee")

    use_identity(str(tmp_path / "p.db"), body)


def test_a_hash_of_a_password_as_typed_before_normalisation_still_matches() -> None:
    async def main() -> tuple[bool, bool]:
        hashing = PasswordHashing(memory_kib=8 * 1024, time_cost=1, parallelism=1)
        typed = unicodedata.normalize("NFD", "café-crème-brûlée")
        old = hashing._hasher.hash(typed)  # as stored before passwords were normalised
        return await hashing.verify(old, typed)

    assert run(main()) == (True, True)  # matches, and is re-hashed normalised


@pytest.mark.parametrize("password", [" " * 12, "a" * 12, "\t" * 20])
def test_blank_or_one_character_passwords_are_refused(password: str) -> None:
    with pytest.raises(Invalid, match="blank or one character"):
        check_password_rules(password)
