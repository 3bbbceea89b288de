"""The plan every engine runs, and the input helpers the driver and the engines share.

extract.py hashes the items, resumes against --out and calls `make_plan` on what is left; an engine
(engines/) turns the plan's batches into `EmbeddedBatch`es; extract.py's one writer stores them.
Everything here is plain data and file reading: no model, no engine, no extract.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from embedkit.items import Item


@dataclass
class Plan:
    modality: str  # "image" or "text"
    batches: list[list[Item]]  # embedded in this order, one encoder call each
    groups: dict[str, list[Item]]  # an embedded item's id -> every item that receives its vector

    def items(self):
        """The items to embed, batch after batch."""
        return (it for batch in self.batches for it in batch)


class EmbeddedBatch(NamedTuple):
    """One planned batch after an engine ran it: what every engine yields to the writer."""

    batch: list[Item]
    ok: list[Item]  # embedded, in batch order
    vectors: np.ndarray | None  # one row per ok item (None when none is)
    bad: list[tuple[Item, str]]  # (item, reason it could not be embedded)
    truncated: int  # texts cut at the encoder's max length


def make_plan(modality: str, pending: list[Item], hashes: dict[str, str], batch_size: int) -> Plan:
    """The batches every engine embeds, and for each embedded item the ids that receive its vector."""
    if modality == "image":
        # identical files are embedded once and written under every id that points at them
        by_hash: dict[str, list[Item]] = {}
        for it in pending:
            by_hash.setdefault(hashes[it.id], []).append(it)
        groups = {group[0].id: group for group in by_hash.values()}
    else:
        # length-sorted batching: longest first so the first batch shows the memory peak
        order = sorted(pending, key=lambda it: -(len(it.text) if it.text is not None else input_size(it.text_path)))
        groups = {it.id: [it] for it in order}
    units = [group[0] for group in groups.values()]
    return Plan(modality, [units[i:i + batch_size] for i in range(0, len(units), batch_size)], groups)


def item_path(it: Item, modality: str) -> Path | None:
    """The file an item's `modality` comes from (None: text given inline)."""
    return it.image_path if modality == "image" else it.text_path


def read_item_text(it: Item) -> tuple[str | None, str | None]:
    """(text as embedded, None) or (None, reason). Reasons never quote the text. Report files of every kind
    (plain text, PDF, .docx, .rtf, .html) are read by documents.read_report."""
    if it.text is None:
        from embedkit.documents import read_report

        return read_report(it.text_path)
    if not it.text.strip():
        return None, "empty text"
    return it.text.strip(), None


def input_size(path: Path | None) -> int:
    """Bytes of an input file; 0 when there is none or it cannot be read (reading it reports why)."""
    try:
        return path.stat().st_size
    except OSError:
        return 0
