"""Data manifests: one TOML file per dataset (data_manifests/*.toml) saying where its files are, how its
metadata becomes rows, text and labels, and what leaks. The schema is documented in data_manifests/SCHEMA.md.

One module per reader:
  schema.py    the keys each table allows (kinds, choices, required)
  lines.py     where a key is in the TOML text, for `FILE, line N, key K: problem` errors
  validate.py  load_manifest: read + validate one file -> DatasetManifest
  manifest.py  DatasetManifest: the validated keys and the columns it names or adds
  derive.py    value matching, filters and label derivation
  rows.py      load_rows: metadata files under a data root -> checked rows
  leakage.py   the columns a text must not name, and the SourceOptions extract reads
  find.py      find_manifest / list_manifests over the shipped data_manifests folder
"""

from embedkit.manifests.derive import Filter, Label
from embedkit.manifests.find import find_manifest, list_manifests, manifest_dirs
from embedkit.manifests.manifest import DatasetManifest, Join
from embedkit.manifests.schema import ACCESS, IMAGE_PATH_COL, OPS, TABLE_SUFFIXES, TASKS, TEXT_PATH_COL
from embedkit.manifests.validate import load_manifest

__all__ = ["ACCESS", "IMAGE_PATH_COL", "OPS", "TABLE_SUFFIXES", "TASKS", "TEXT_PATH_COL", "DatasetManifest",
           "Filter", "Join", "Label", "find_manifest", "list_manifests", "load_manifest", "manifest_dirs"]
