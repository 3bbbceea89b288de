"""The leakage lists: which columns a manifest's text must not name, and the SourceOptions that carry them
(with the rest of what `extract` reads from a manifest) to the item scan."""

from __future__ import annotations

from embedkit.items import SourceOptions
from embedkit.manifests.schema import IMAGE_PATH_COL, TEXT_PATH_COL


def leaking_columns(m) -> list[str]:
    """[leakage].fields, then the source columns of the labels (a derived label's raw column is the answer too)."""
    sources = [c for lab in m.labels for c in (lab.column, *(lab.columns or ())) if c]
    return list(dict.fromkeys([*m.leakage_fields, *sources]))


def source_options(m) -> SourceOptions:
    """How `extract` reads manifest `m`'s rows; a text template (its own or --text-template) may name neither
    [leakage].fields nor the columns the labels are derived from, unless leakage is allowed."""
    return SourceOptions(metadata=None, id_col=m.id_col, image_col=IMAGE_PATH_COL if m.has_image else None,
                         text_col=m.text_col, text_template=m.text_template,
                         text_file_col=TEXT_PATH_COL if m.text_file_pattern else m.text_file_col,
                         label_cols=[lab.name for lab in m.labels], split_col=m.split_col,
                         group_col=m.group_col, leakage_fields=leaking_columns(m), dataset=dataset_card(m))


def dataset_card(m) -> dict:
    """What a model card says of the data: source, licence, citation, split advice and each label's meaning
    (its class names where the derivation gives them: yes_no -> 0 = no, 1 = yes; a map -> its first key)."""
    labels = {}
    for lab in m.labels:
        names = {}
        derive = lab.derive or {}
        if derive.get("yes_no"):
            names = {"0": "no", "1": "yes"}
        for raw, value in derive.get("map", {}).items():
            names.setdefault(str(value), str(raw))
        labels[lab.name] = {"task": lab.task, "description": lab.description, "source_column": lab.column,
                            "class_names": names, "positive": lab.positive}
    return {"manifest": m.name, "description": m.description, "license": m.license, "access": m.access,
            "citation": m.citation, "homepage": m.homepage, "split": m.split_recommended,
            "group_col": m.group_col, "leakage_notes": list(m.leakage), "labels": labels}
