"""``cube``: dispatches to subcommands defined beside the code they drive.

``cube attest`` lives in :mod:`attestation.cli`. Later packages add theirs (``cube verify``,
``cube admin``, ``cube measure``) by registering here.
"""

from __future__ import annotations

import click

from attestation.cli import attest
from cube.chat import chat
from cube.measure.cli import measure
from cube.verify_cli import verify
from proxy.admin_cli import admin


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cube")
def cube() -> None:
    """Cube: confidential LLM inference you can verify."""


cube.add_command(attest)
cube.add_command(admin)
cube.add_command(verify)
cube.add_command(measure)
cube.add_command(chat)


def main() -> None:
    cube(prog_name="cube", auto_envvar_prefix="CUBE")


if __name__ == "__main__":
    main()
