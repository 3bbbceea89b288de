"""What a user reads: every command's --help stays legible in an 80-column terminal, every switch reads
--x/--no-x, stdout carries at most one compact line, and the containers a notebook prints are one line.

Rich squeezes a help table that does not fit by cutting its widest cells, flag names included
("--late-hidden-…"); a user then cannot type the flag. The help is rendered the way a terminal of 80
columns gets it (COLUMNS=80) for every command and sub-command the app has, so a new command or
option is checked without editing this file.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import typer.main
from typer.testing import CliRunner

from conftest import REPO
from embedkit.cli import app
from embedkit.manifests import find_manifest
from embedkit.store import load_embeddings, read_embedding_table


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
    assert "<bool>" not in out, out  # a flag takes no value: no type placeholder beside it
    # a value is named TEXT, INTEGER, FLOAT or PATH, never by its Python type (<list[str]>, <int>, <float>)
    options = [line for line in out.splitlines() if line.lstrip("│ *").startswith("-")]
    assert not [line for line in options if re.search(r"<(str|int|float|path|list\[)", line)], out
    usage = next(line for line in out.splitlines() if "Usage:" in line)
    assert "{" not in usage and "}" not in usage, usage  # arguments read DATA, not {data}
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


def _two_encoders(folder, n=300, seed=0):
    """An extract-shaped folder (real Parquet through the store): image 24-d and text 40-d sharing a signal."""
    from test_train import write_embeddings

    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 8))
    ids = np.array([f"i{i}" for i in range(n)], dtype=object)
    cols = {"dx": np.array(["a", "b"] * (n // 2), dtype=object),
            "split": np.array(["train"] * (n * 2 // 3) + ["test"] * (n - n * 2 // 3), dtype=object)}
    for m, width in (("image", 24), ("text", 40)):
        x = latent @ rng.normal(size=(8, width)) + 0.1 * rng.normal(size=(n, width))
        write_embeddings(folder, m, f"{m}-enc", ids, x.astype(np.float32), cols)
    return folder


def test_project_and_retrieval_keep_stdout_to_one_compact_line(tmp_path):
    emb, out = _two_encoders(tmp_path / "emb"), tmp_path / "proj"
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    r = subprocess.run([sys.executable, "-m", "embedkit.cli", "project", emb, "--out", out, "--dim", "8",
                        "--epochs", "10"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""  # the per-epoch losses go to the file, not the terminal
    bar, summary = r.stderr.splitlines()[0], "\n".join(r.stderr.splitlines()[1:])
    assert bar.startswith("projection epochs") and "10/10" in bar, r.stderr  # the progress bar, on stderr
    assert summary.startswith("project: 300 rows -> 8-d linear space") and len(summary) < 400, r.stderr  # one summary
    assert len(json.loads((out / "manifest.json").read_text())["fit"]["train_loss"]) == 10
    r = subprocess.run([sys.executable, "-m", "embedkit.cli", "retrieval", out], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 1 and json.loads(r.stdout)["n"] == 300
    assert json.loads((out / "retrieval.json").read_text()) == json.loads(r.stdout)


def test_containers_print_as_one_short_line(tmp_path):
    emb = _two_encoders(tmp_path / "emb", n=3000)
    es = load_embeddings(emb)
    text = repr(es)
    assert "\n" not in text and len(text) < 200, text
    assert text.startswith("EmbeddingSet(3000 ids; image 24-d image-enc, text 40-d text-enc; columns: ")
    assert all(c in text for c in es.columns)
    table = read_embedding_table(next(emb.glob("text__*")))
    assert repr(table).startswith("EmbeddingTable(3000 ids, 40-d text-enc, columns: ") and "\n" not in repr(table)
    m = find_manifest("vqa_rad")
    assert "\n" not in repr(m) and len(repr(m)) < 200 and m.name in repr(m), repr(m)
    from embedkit.extract import ExtractResult, ModalityResult
    from embedkit.items import SkippedInput

    skipped = [SkippedInput(f"id{i}", f"/data/{i}.png", "decode", "truncated JPEG") for i in range(5000)]
    result = ExtractResult("/out", "paired folder", {}, {"image": ModalityResult("image", "dinov2-s", "image__d")},
                           skipped, {})
    assert repr(result) == "ExtractResult('/out'; paired folder; image dinov2-s; 5000 skipped)"
