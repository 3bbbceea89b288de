"""Finding manifests: by path, or by name in the shipped data_manifests folder."""

from __future__ import annotations

from pathlib import Path

from embedkit.errors import EmbedkitError
from embedkit.manifests.manifest import DatasetManifest
from embedkit.manifests.validate import load_manifest


def manifest_dirs() -> list[Path]:
    """The repository's data_manifests folder, else a copy shipped inside the package."""
    package = Path(__file__).resolve().parents[1]  # embedkit/
    return [d for d in (package.parent / "data_manifests", package / "data_manifests") if d.is_dir()]


def list_manifests(folder: str | Path | None = None) -> list[DatasetManifest]:
    folders = [Path(folder)] if folder is not None else manifest_dirs()[:1]
    return sorted((load_manifest(p) for d in folders for p in d.glob("*.toml")), key=lambda m: m.name)


def find_manifest(name_or_path: str | Path) -> DatasetManifest:
    """A manifest by path, or by bare name (file stem or `name` key) in the shipped data_manifests folder."""
    p = Path(name_or_path)
    if p.suffix == ".toml" or len(p.parts) > 1 or p.is_file():
        if not p.is_file():
            raise EmbedkitError(f"manifest file {p} not found")
        return load_manifest(p)
    name = str(name_or_path).strip().lower().replace("-", "_")
    for d in manifest_dirs():
        if (d / f"{name}.toml").is_file():
            return load_manifest(d / f"{name}.toml")
    known = list_manifests() if manifest_dirs() else []
    for m in known:
        if m.name.lower().replace("-", "_") == name:
            return m
    raise EmbedkitError(f"no dataset manifest named '{name_or_path}' (known: "
                        f"{', '.join(m.name for m in known) or 'none'}); or pass the path of a .toml file")
