"""The READMEs' benchmark figures are rendered from the committed results, not typed in: every
`<!-- bench:NAME -->` block must equal what `embedkit bench --markdown` renders from benchmarks/results."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from embedkit.bench.tables import BLOCKS, block_names, refresh_files, render_block, render_blocks
from embedkit.cli import app
from embedkit.errors import EmbedkitError

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
READMES = [REPO / "README.md", REPO / "benchmarks" / "README.md"]


@pytest.mark.parametrize("path", READMES, ids=lambda p: str(p.relative_to(REPO)))
def test_committed_tables_match_committed_results(path):
    text = path.read_text()
    assert block_names(text), f"{path} has no bench blocks"
    stale = refresh_files([path], RESULTS, write=False)[path]
    assert not stale, f"stale blocks {stale}: run `embedkit bench --markdown --update README.md benchmarks/README.md`"
    assert render_blocks(text, RESULTS) == text


def test_every_block_is_used_and_renders_its_numbers():
    used = {name for p in READMES for name in block_names(p.read_text())}
    assert used == set(BLOCKS)  # no block rendered for nobody, none typed in under an unknown name
    # spot checks against the raw results: the figures the README once typed in by hand
    assert "| 2.769 |" in render_block("full-targets", RESULTS)
    assert "fp32 matmul 183.0 GFLOP/s" in render_block("full-machine", RESULTS)
    assert "model stage alone: 0.7103" in render_block("full-targets", RESULTS)


def test_update_rewrites_a_stale_block_and_check_mode_fails(tmp_path):
    readme = tmp_path / "README.md"
    shutil.copy(REPO / "README.md", readme)
    text = readme.read_text()
    edited = text.replace("| 2.769 |", "| 2.9 |", 1)  # a hand-typed figure drifting from bench.json
    assert edited != text
    readme.write_text(edited)
    run = CliRunner().invoke(app, ["bench", "--markdown", "--results", str(RESULTS), str(readme)])
    assert run.exit_code == 1 and "stale full-targets" in run.output
    assert readme.read_text() == edited  # checking writes nothing
    run = CliRunner().invoke(app, ["bench", "--markdown", "--update", "--results", str(RESULTS), str(readme)])
    assert run.exit_code == 0, run.output
    assert readme.read_text() == text


def test_markdown_prints_every_block_with_its_markers():
    run = CliRunner().invoke(app, ["bench", "--markdown", "--results", str(RESULTS)])
    assert run.exit_code == 0, run.output
    for name in BLOCKS:
        assert f"<!-- bench:{name} -->\n{render_block(name, RESULTS)}<!-- /bench -->" in run.output


def test_unknown_block_and_missing_results_are_one_line_errors(tmp_path):
    with pytest.raises(EmbedkitError, match="unknown bench block 'nope'"):
        render_blocks("<!-- bench:nope -->\n<!-- /bench -->", RESULTS)
    with pytest.raises(EmbedkitError, match="does not exist"):
        render_block("full-targets", tmp_path)
    plain = tmp_path / "plain.md"
    plain.write_text("no blocks here\n")
    run = CliRunner().invoke(app, ["bench", "--markdown", "--update", str(plain)])
    assert run.exit_code != 0 and "no bench blocks" in str(run.exception)
