"""Where the "embed the pending items" step of extract.py runs. "local" lives in extract.py itself;
the others are imported only when asked for, so their packages stay optional."""

from __future__ import annotations

from embedkit.errors import EmbedkitError

ENGINES = ("local", "ray")


def check_engine(name: str) -> None:
    """Fail with one line before any work when the engine is unknown or its package is missing."""
    if name not in ENGINES:
        raise EmbedkitError(f"unknown engine '{name}' (choose {' or '.join(ENGINES)})")
    if name == "ray":
        try:
            import ray.data  # noqa: F401
        except ImportError:
            raise EmbedkitError("--engine ray needs Ray Data: pip install 'embedkit[ray]'") from None
