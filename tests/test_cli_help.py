"""Every command's --help stays legible in an 80-column terminal, and every switch reads --x/--no-x.

Rich squeezes a help table that does not fit by cutting its widest cells, flag names included
("--late-hidden-…"); a user then cannot type the flag. The help is rendered the way a terminal of 80
columns gets it (COLUMNS=80) for every command and sub-command the app has, so a new command or
option is checked without editing this file.
"""

from __future__ import annotations

import re

import pytest
import typer.main
from typer.testing import CliRunner

from embedkit.cli import app


def _commands(group, path=()):
    for name, cmd in group.commands.items():
        yield path + (name,), cmd
        if hasattr(cmd, "commands"):  # a sub-app such as `models`
            yield from _commands(cmd, path + (name,))


COMMANDS = [((), typer.main.get_command(app)), *_commands(typer.main.get_command(app))]


def _flags(cmd):
    return [p for p in cmd.params if getattr(p, "is_flag", False) and not p.hidden]


@pytest.mark.parametrize("path,cmd", COMMANDS, ids=[" ".join(p) or "embedkit" for p, _ in COMMANDS])
def test_help_at_80_columns_shows_every_flag_name_whole(path, cmd, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    r = CliRunner().invoke(app, [*path, "--help"], terminal_width=80)
    assert r.exit_code == 0, r.output
    out = r.output
    assert max(map(len, out.splitlines())) <= 80
    assert "--no-no-" not in out
    assert "…" not in out, out  # rich's mark of a cut cell
    for p in cmd.params:
        if p.hidden:
            continue
        for name in (*p.opts, *p.secondary_opts):
            if name.startswith("--"):
                assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", out), f"{name} cut or missing:\n{out}"


@pytest.mark.parametrize("path,cmd", COMMANDS, ids=[" ".join(p) or "embedkit" for p, _ in COMMANDS])
def test_every_switch_is_an_x_no_x_pair(path, cmd):
    for p in _flags(cmd):
        [on], [off] = [o for o in p.opts if o.startswith("--")], p.secondary_opts
        assert off == "--no-" + on[2:] and not on.startswith("--no-"), (path, p.opts, p.secondary_opts)
