"""A new user's first hour (issue 28): offline first, a demo worth keeping, tables that fit 80 columns.

No test here needs a network. A "hub that does not answer" is a local socket that accepts connections
and never replies (HF_ENDPOINT points at it), which is what a captive portal or a dead proxy does; the
same socket counts connections, so "no network call" is checked, not assumed.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from rich.console import Console
from rich.table import Table

from conftest import REPO


class SilentHub:
    """A TCP server that accepts and never answers; `connections` counts who tried."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections, self.held = 0, []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            self.held.append(conn)  # kept open, never answered

    def close(self):
        self.sock.close()
        for c in self.held:
            c.close()


@pytest.fixture
def silent_hub():
    hub = SilentHub()
    yield hub
    hub.close()


def _online_env(tmp_path, hub: SilentHub, **extra) -> dict:
    """A connected-looking machine (no HF_HUB_OFFLINE) whose hub is `hub`, with an empty cache and store."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    return {**env, "PYTHONPATH": str(REPO), "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"),
            "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"), "EMBEDKIT_MODEL_STORE": str(tmp_path / "store"),
            "EMBEDKIT_CACHE": str(tmp_path / "cache"), "COLUMNS": "200", **extra}


def _cli(args, env, timeout=120):
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "embedkit.cli", *map(str, args)], capture_output=True, text=True,
                       env=env, timeout=timeout)
    return r, time.perf_counter() - t0


def _one_error_line(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert "Retrying" not in stderr and "Traceback" not in stderr, stderr
    return errors[0]


def test_a_model_not_here_fails_at_once_in_one_line_when_the_hub_is_silent_or_offline(paired_folder, tmp_path,
                                                                                        silent_hub):
    env = _online_env(tmp_path, silent_hub)
    r, seconds = _cli(["extract", paired_folder, "--out", tmp_path / "emb", "--image-model", "dinov2-base",
                       "--text-model", "none"], env)
    assert r.returncode == 2, r.stderr
    line = _one_error_line(r.stderr)
    assert "did not answer within 2 s" in line and "embedkit models pack dinov2-base" in line, line
    assert seconds < 30, seconds  # the probe waits 2 s; huggingface_hub alone retries for minutes here
    assert silent_hub.connections >= 1  # it did ask, once
    assert not (tmp_path / "emb" / "manifest.json").exists()

    asked = silent_hub.connections
    r, _ = _cli(["extract", paired_folder, "--out", tmp_path / "emb", "--image-model", "dinov2-base",
                 "--text-model", "none"], {**env, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and "HF_HUB_OFFLINE is set" in _one_error_line(r.stderr)
    assert silent_hub.connections == asked  # offline means not even a probe


def test_a_hub_that_refuses_at_once_costs_no_wait(paired_folder, tmp_path, silent_hub):
    """A closed port (or a failed DNS lookup) ends the probe at once: no timeout is waited out."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{closed.getsockname()[1]}"
    closed.close()  # nothing listens there now: connection refused
    env = {**_online_env(tmp_path, silent_hub), "HF_ENDPOINT": url, "EMBEDKIT_HUB_TIMEOUT": "60"}
    r, seconds = _cli(["models", "check", "dinov2-base"], env)
    assert r.returncode == 2, r.stderr
    assert "cannot be reached from here" in _one_error_line(r.stderr)
    assert seconds < 30, seconds  # the 60 s timeout was not waited out


def test_a_model_in_the_hub_cache_loads_with_no_network_call(tiny_models, paired_folder, tmp_path, silent_hub):
    from test_bundles import _hub_cache

    cache = _hub_cache(tmp_path, tiny_models["dinov2"], repo="org/tiny-dinov2")
    env = _online_env(tmp_path, silent_hub, HF_HUB_CACHE=str(cache))
    r, _ = _cli(["extract", paired_folder, "--out", tmp_path / "emb", "--image-model", "hf:org/tiny-dinov2",
                 "--text-model", "none", "--backend", "torch", "--no-progress"], env)
    assert r.returncode == 0, r.stderr
    assert silent_hub.connections == 0, r.stderr  # found in the cache: the hub is never asked
    manifest = json.loads((tmp_path / "emb" / "manifest.json").read_text())
    assert manifest["modalities"]["image"]["rows_total"] == 8


def _invoke(args):
    """The CLI in this process (the exit code of an EmbedkitError, 2, is main()'s: tested in test_faults)."""
    from typer.testing import CliRunner

    from embedkit.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_models_check_fails_when_no_backend_works_or_the_model_is_not_here(tiny_models, tmp_path, monkeypatch):
    """A model folder whose weights are damaged: every row of the check is an error, and the check fails (it
    exited 0 with every row saying "error"); a model that is not here fails before any backend is tried."""
    import shutil

    from embedkit.errors import EmbedkitError

    monkeypatch.setenv("EMBEDKIT_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "broken-dinov2"
    shutil.copytree(tiny_models["dinov2"], folder)
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    r = _invoke(["models", "check", folder, "--backend", "torch"])
    assert isinstance(r.exception, EmbedkitError) and "no backend runs" in str(r.exception), r.output
    assert "damaged or incomplete" in r.output  # the reason, said once above the failure
    r = _invoke(["models", "check", "dinov2-base"])  # HF_HUB_OFFLINE=1 here (conftest)
    assert isinstance(r.exception, EmbedkitError) and "HF_HUB_OFFLINE is set" in str(r.exception), r.output
    assert "embedkit models pack dinov2-base" in str(r.exception)


# ---------------------------------------------------------------- tables at 80 columns


def _render(table, width=80) -> str:
    from embedkit.console import show_table

    buf = io.StringIO()
    show_table(table, Console(file=buf, width=width, highlight=False, color_system=None))
    return buf.getvalue()


def test_a_table_that_fits_stays_a_table_and_one_that_does_not_keeps_every_value_whole():
    small = Table(title="t")
    for c in ("name", "dim"):
        small.add_column(c)
    small.add_row("minilm", "384")
    out = _render(small)
    assert "┃ name" in out and "minilm" in out and max(map(len, out.splitlines())) <= 80

    command = "hf download mradermacher/Qwen2.5-0.5B-GGUF Qwen2.5-0.5B.Q8_0.gguf && embedkit models pack x --out y"
    wide = Table(title="wide")
    for c in ("modality · model", "rows", "new", "items/s", "peak MB", "how to get it"):
        wide.add_column(c)
    wide.add_row("image · efficientnet-lite0", "2095", "2095", "17.7", "977", command)
    out = _render(wide)
    assert "┃" not in out and "…" not in out, out  # not a squeezed table
    assert command in " ".join(line.strip() for line in out.splitlines()), out  # broken between words only
    assert "image · efficientnet-lite0" in out.splitlines()[1] and "peak MB: 977" in out
    assert max(map(len, out.splitlines())) <= 80, out


def test_listings_go_to_stdout_and_fit_80_columns(tmp_path, monkeypatch):
    from embedkit.console import stdout_console

    monkeypatch.setenv("EMBEDKIT_MODEL_STORE", str(tmp_path / "s"))
    monkeypatch.setattr(stdout_console, "width", 80)
    for args, names in ((["datasets"], ("brset", "vqa_rad", "mimic_cxr")),
                        (["models"], ("dinov2-small", "efficientnet-lite0", "hf download facebook/dinov2-base"))):
        r = _invoke(args)
        assert r.exit_code == 0, r.output
        assert all(n in r.stdout for n in names), r.stdout  # `embedkit datasets > file` keeps the list
        assert "…" not in r.stdout and max(map(len, r.stdout.splitlines())) <= 80, r.stdout


# ---------------------------------------------------------------- memory per step


def test_reset_peak_rss_makes_the_next_peak_a_steps_own():
    """In a fresh interpreter: in a long test session freed memory may stay resident (the allocator keeps its
    arenas), and then neither the peak nor the current size moves with one array."""
    code = """
import numpy as np
from embedkit.costs import current_rss_mb, peak_rss_mb, reset_peak_rss
if not reset_peak_rss():
    print("skip"); raise SystemExit
big = np.ones(80 * 2**20 // 8)  # 80 MB, touched: a fresh interpreter maps new pages for it
del big
before = peak_rss_mb()
assert reset_peak_rss()
after = peak_rss_mb()
assert after < before - 60 and after <= current_rss_mb() + 5, (before, after)
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    if r.stdout.strip() == "skip":
        pytest.skip("this OS does not let a process reset its peak-memory mark (/proc/self/clear_refs)")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
