"""Engines: where the plan's batches are embedded. Each is one module with `check` and `open_stream`
(engines/base.py, `Engine`), imported only when asked for, so that its packages stay optional.
A new engine is one file here and one line in ENGINES."""

from __future__ import annotations

import importlib

from embedkit.errors import EmbedkitError

ENGINES = {
    "local": "embedkit.engines.local",  # this process
    "ray": "embedkit.engines.ray",  # Ray Data actors (pip install 'embedkit[ray]')
}


def get_engine(name: str):
    """The engine module `name`, checked: an unknown engine or a missing package fails with one line."""
    if name not in ENGINES:
        raise EmbedkitError(f"unknown engine '{name}' (choose {' or '.join(ENGINES)})")
    engine = importlib.import_module(ENGINES[name])
    engine.check()
    return engine
