"""The grid of `embedkit compare`: which encoders, which fusions, which alignments, and which cannot run.

An encoder is one extracted (modality, model) table; a configuration is an image encoder and/or a
text encoder, a fusion and an alignment. A configuration that cannot run on this data (text-only
fusion without texts, alignment across two spaces of different widths) stays in the grid with its
reason, so the leaderboard says why it has no score instead of leaving it out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from embedkit.errors import EmbedkitError

BASELINES = ("majority", "chance")  # predictors that ignore the input: the most frequent class, a draw by prior
ONE_MODALITY = ("image", "text")
ALIGNMENTS = ("none", "center", "shift", "standardize")


@dataclass(frozen=True)
class Encoder:
    modality: str
    name: str  # as `extract` recorded it (the registry name, hf id or folder)
    folder: Path  # the dataset folder: OUT/emb/image__efficientnet-lite0, ...
    dim: int
    fingerprint: str  # the encoder's identity (weights included); two tables of one encoder share it


@dataclass(frozen=True)
class Configuration:
    fusion: str  # a fusion of `train`, "logistic", or a baseline (majority, chance)
    image: Encoder | None = None
    text: Encoder | None = None
    align: str = "none"
    reason: str | None = None  # why it cannot run here (None: it can)

    @property
    def name(self) -> str:
        encoders = " + ".join(e.name for e in (self.image, self.text) if e is not None) or "no input"
        return f"{encoders} · {self.fusion}" + (f" · {self.align}" if self.align != "none" else "")

    @property
    def slug(self) -> str:
        parts = [self.image.name if self.image else "-", self.text.name if self.text else "-", self.fusion, self.align]
        return "__".join(re.sub(r"[^A-Za-z0-9._-]+", "-", p).strip("-") or "-" for p in parts)

    @property
    def modalities(self) -> list[str]:
        return [m for m, e in (("image", self.image), ("text", self.text)) if e is not None]

    def describe(self) -> dict:
        return {"config": self.name, "image_model": self.image.name if self.image else None,
                "text_model": self.text.name if self.text else None, "fusion": self.fusion, "align": self.align}


def find_encoders(folders: list[Path]) -> list[Encoder]:
    """Every (modality, model) table under the given extract folders."""
    from embedkit.guards import FINGERPRINT_KEY
    from embedkit.store import find_datasets, part_files, read_provenance

    found: dict[tuple[str, str], Encoder] = {}
    for folder in folders:
        for modality, dirs in find_datasets(folder).items():
            if modality not in ONE_MODALITY:
                continue
            for d in dirs:
                prov = read_provenance(part_files(d)[0])
                name = str(prov.get("name") or d.name.split("__", 1)[1])
                enc = Encoder(modality, name, d, int(prov.get("dim") or 0),
                              str(prov.get(FINGERPRINT_KEY) or prov.get("revision") or d.resolve()))
                key = (modality, name)
                if key in found and found[key].fingerprint != enc.fingerprint:
                    raise EmbedkitError(f"two {modality} tables named '{name}' come from different encoders "
                                        f"({found[key].folder} and {d}); compare one of them")
                found.setdefault(key, enc)
    return sorted(found.values(), key=lambda e: (e.modality, e.name))


def pick(encoders: list[Encoder], modality: str, wanted: list[str] | None) -> list[Encoder]:
    """The encoders of one modality that were asked for (all when None), in the order asked."""
    have = [e for e in encoders if e.modality == modality]
    if wanted is None:
        return have
    by_name = {e.name: e for e in have} | {e.folder.name.split("__", 1)[1]: e for e in have}
    unknown = [w for w in wanted if w not in by_name]
    if unknown:
        raise EmbedkitError(f"unknown {modality} encoder '{unknown[0]}' in these embeddings; available: "
                            f"{', '.join(e.name for e in have) or 'none'}")
    return [by_name[w] for w in dict.fromkeys(wanted)]


def check_fusions(fusions: list[str], offered: tuple[str, ...]) -> list[str]:
    unknown = [f for f in fusions if f not in offered + BASELINES]
    if unknown:
        raise EmbedkitError(f"unknown fusion '{unknown[0]}' (choose from {', '.join(offered)}; the baselines "
                            f"{', '.join(BASELINES)} are always included)")
    return [f for f in dict.fromkeys(fusions) if f not in BASELINES]


def check_alignments(aligns: list[str]) -> list[str]:
    unknown = [a for a in aligns if a not in ALIGNMENTS]
    if unknown:
        raise EmbedkitError(f"unknown alignment '{unknown[0]}' (choose from {', '.join(ALIGNMENTS)})")
    return list(dict.fromkeys(aligns)) or ["none"]


def configurations(images: list[Encoder], texts: list[Encoder], fusions: list[str], aligns: list[str]) -> list[
        Configuration]:
    """Baselines first, then every fusion over every encoder (pair); alignments only where both modalities
    meet (a one-modality head has nothing to align to)."""
    grid = [Configuration(b) for b in BASELINES]
    pairs = [(i, t) for i in images for t in texts]
    for fusion in fusions:
        if fusion in ONE_MODALITY:
            encoders = images if fusion == "image" else texts
            grid += [Configuration(fusion, **{fusion: e}) for e in encoders] or [
                Configuration(fusion, reason=f"no {fusion} embeddings in this data")]
        elif fusion == "logistic":
            grid += ([Configuration(fusion, i, t) for i, t in pairs] or
                     [Configuration(fusion, image=i) for i in images] + [Configuration(fusion, text=t) for t in texts])
        else:  # a fusion of both modalities
            if not pairs:
                have = "images" if images else "texts" if texts else "neither modality"
                grid.append(Configuration(fusion, reason=f"needs image and text embeddings; this data has {have} only"))
                continue
            for i, t in pairs:
                for align in aligns:
                    reason = None
                    if align != "none" and i.dim != t.dim:
                        reason = (f"{align} alignment needs image and text in one space ({i.dim}-d vs {t.dim}-d): "
                                  f"use a CLIP or shared: encoder, or `embedkit project`")
                    grid.append(Configuration(fusion, i, t, align, reason))
    return grid
