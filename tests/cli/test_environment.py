"""Options from the environment: ``cube`` reads ``CUBE_<COMMAND>_<OPTION>`` for every option
(the rule the docs state), except those that loosen a verdict or a policy, grant powers or
skip a confirmation, which are said on the command line only."""

from __future__ import annotations

import json
from pathlib import Path

import click
from click.testing import CliRunner

from cube.cli import cube
from tests import vectors

#: Options that must never come from the environment.
COMMAND_LINE_ONLY = {
    ("attest", "verify", "--at"),
    ("attest", "verify", "--allow-simulated"),
    ("attest", "verify", "--accept-tcb-status"),
    ("measure", "--pcrs"),
    ("measure", "--require-event-log"),
    ("measure", "--kernel-load-measured"),
    ("measure", "--pcr11-phases"),
    ("admin", "users", "create", "--admin"),
    ("admin", "users", "update", "--admin"),
    ("admin", "domains", "create", "--owner-email"),
    ("admin", "domains", "delete", "--yes"),
    ("admin", "members", "add", "--role"),
    ("admin", "tokens", "create", "--action"),
    ("admin", "tokens", "create", "--model"),
    ("admin", "backends", "add", "--model"),
    ("admin", "backends", "update", "--model"),
    ("admin", "backends", "update", "--enable"),
}


def _options(
    command: click.Command, path: tuple[str, ...]
) -> list[tuple[tuple[str, ...], click.Option]]:
    if isinstance(command, click.Group):
        return [
            found
            for name, sub in command.commands.items()
            for found in _options(sub, (*path, name))
        ]
    return [(path, p) for p in command.params if isinstance(p, click.Option)]


def test_every_option_reads_the_documented_variable_or_none() -> None:
    wrong = []
    for path, option in _options(cube, ()):
        flag = next(o for o in option.opts if o.startswith("--"))
        if (*path, flag) in COMMAND_LINE_ONLY:
            assert not option.allow_from_autoenv and not option.envvar, (path, flag)
            continue
        if option.envvar or not option.allow_from_autoenv:
            continue  # named explicitly (CUBE_VERIFY_API_KEY, ...) or not from the environment
        documented = "_".join(["CUBE", *path, flag[2:]]).upper().replace("-", "_")
        derived = "_".join(["CUBE", *path, option.name or ""]).upper().replace("-", "_")
        if derived != documented:
            wrong.append(f"{' '.join(path)} {flag}: reads {derived}, not {documented}")
    assert wrong == []


def test_the_documented_policy_variable_is_the_policy(tmp_path: Path) -> None:
    """CUBE_ATTEST_VERIFY_POLICY was silently ignored (the option's name made the variable
    CUBE_ATTEST_VERIFY_POLICY_PATH), and the default policy accepted what it pinned out."""
    pin = tmp_path / "pin.json"
    pin.write_text(
        json.dumps({"format": "cube-policy/1", "sev_snp": {"measurements": ["00" * 48]}})
    )
    vector = vectors.vector("snp-genoa-v5-oak")
    args = [
        "attest",
        "verify",
        "--platform",
        "sev-snp",
        "--report",
        str(vectors.path(vector["files"]["report"]["path"])),
        "--vcek",
        str(vectors.path(vector["files"]["vcek"]["path"])),
        "--at",
        "2026-01-01T00:00:00Z",
    ]
    runner = CliRunner()
    plain = runner.invoke(cube, args, auto_envvar_prefix="CUBE", env={})
    pinned = runner.invoke(
        cube, args, auto_envvar_prefix="CUBE", env={"CUBE_ATTEST_VERIFY_POLICY": str(pin)}
    )
    assert plain.exit_code == 0, plain.output
    assert pinned.exit_code == 5, pinned.output  # the policy's measurement is not this one


def test_inputs_of_another_platform_are_a_usage_error(tmp_path: Path) -> None:
    """They were silently ignored: a TDX run given a garbage --crl/--vcek accepted, and the user
    could think an AMD CRL had been checked."""
    garbage = tmp_path / "g.bin"
    garbage.write_bytes(b"garbage")
    tdx = vectors.vector("tdx-v4-phala-uptodate")
    snp = vectors.vector("snp-genoa-v5-oak")
    quote = str(vectors.path(tdx["files"]["quote"]["path"]))
    report = str(vectors.path(snp["files"]["report"]["path"]))
    vcek = str(vectors.path(snp["files"]["vcek"]["path"]))
    runner = CliRunner()
    for args in (
        ["--platform", "tdx", "--quote", quote, "--crl", str(garbage)],
        ["--platform", "tdx", "--quote", quote, "--vcek", str(garbage)],
        ["--platform", "sev-snp", "--report", report, "--vcek", vcek, "--pck-crl", str(garbage)],
        ["--platform", "sev-snp", "--report", report, "--vcek", vcek, "--nonce", "00" * 32],
        ["--evidence", str(garbage), "--nonce", "00" * 32, "--quote", quote],
    ):
        result = runner.invoke(cube, ["attest", "verify", *args])
        assert result.exit_code == 2, (args, result.output)
        assert "would be ignored" in result.output or "--nonce goes with" in result.output


def test_no_option_of_a_role_or_an_owner_reads_the_environment() -> None:
    """CUBE_ADMIN_MEMBERS_ADD_ROLE=owner granted ownership with every `members add`: whatever
    names a role, an owner or an administrator is said on the command line (a new option of
    that kind must join COMMAND_LINE_ONLY)."""
    granting = ("role", "owner", "admin", "action")
    for path, option in _options(cube, ()):
        flag = next(o for o in option.opts if o.startswith("--"))
        if path[0] == "admin" and any(word in flag for word in granting):
            assert (*path, flag) in COMMAND_LINE_ONLY, (path, flag)
