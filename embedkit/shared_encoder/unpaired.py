"""Unpaired images and texts for MoMo's stages: which may be used, and decoded/tokenised once.

Clinics hold many images and reports that were never paired. They come from two places: items of the
input that miss their partner (an image row without a report, a report without an image), and extra
folders (`--extra-images DIR`, `--extra-texts PATH`), which carry no split and count as training data.
Rules of honesty, applied here and tested:
- items of the input are used only when they belong to the training split (the split pairs train on);
- no unpaired item may share an image (same decoded pixels), a text (same words) or a group with a
  held-back row (another split, e.g. test) or with a held-out retrieval row of pretrain's own split.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from embedkit.encoders.preprocess import ImageDecodeError, decode_image
from embedkit.errors import EmbedkitError
from embedkit.items import Item, SkippedInput
from embedkit.plan import read_item_text
from embedkit.shared_encoder.config import SharedEncoderConfig
from embedkit.shared_encoder.runner import image_preprocess, tokenize
from embedkit.sources import TABLE_EXTS, read_table, scan_folder


@dataclass
class Unpaired:
    """Items without a partner for MoMo's stages, and the rows they must never overlap."""

    items: list[Item] = field(default_factory=list)  # images without a text, texts without an image
    held_back: list[Item] = field(default_factory=list)  # rows of other splits: their images/texts/groups stay out


def select_unpaired(items: list[Item], only_split: str | None = None) -> tuple[Unpaired, str]:
    """Items of the input missing their partner, from the split pairs train on, and the held-back rows.

    The split rule is select_pairs' own: `only_split`, else 'train' when any row carries a split, else all.
    """
    target = only_split if only_split is not None else ("train" if any(it.split is not None for it in items) else None)
    lone = [it for it in items if (it.image_path is not None) != it.has_text]  # exactly one half
    chosen = [it for it in lone if target is None or it.split == target]
    held_back = [] if target is None else [it for it in items if it.split != target]
    n_img = sum(it.image_path is not None for it in chosen)
    note = (f"pretrain: {n_img} images without a text and {len(chosen) - n_img} texts without an image"
            + (f" in split '{target}'" if target else "")
            + (f" ({len(lone) - len(chosen)} of other splits left out)" if len(lone) > len(chosen) else ""))
    return Unpaired(chosen, held_back), note


def extra_items(images: str | Path | None = None, texts: str | Path | None = None,
                text_col: str = "text") -> list[Item]:
    """Items of --extra-images (a folder of images) and --extra-texts (a folder of .txt/.md files, or a
    CSV/TSV/JSONL/JSON table with a `text_col` column). They carry no split: training data by definition."""
    out: list[Item] = []
    if images is not None:
        folder = Path(images)
        if not folder.is_dir():
            raise EmbedkitError(f"--extra-images '{folder}' is not a folder")
        found = [it for it in scan_folder(folder).items if it.image_path is not None]
        if not found:
            raise EmbedkitError(f"--extra-images '{folder}' holds no images")
        out += [Item(id=f"extra-image:{it.id}", image_path=it.image_path) for it in found]
    if texts is not None:
        path = Path(texts)
        if path.is_dir():
            found = [Item(id=f"extra-text:{it.id}", text_path=it.text_path)
                     for it in scan_folder(path).items if it.text_path is not None]
        elif Path(path.name.lower().removesuffix(".gz")).suffix in TABLE_EXTS:
            rows = read_table(path)
            if rows and text_col not in rows[0]:
                raise EmbedkitError(f"--extra-texts {path.name} has no column '{text_col}' (--extra-text-col)")
            found = [Item(id=f"extra-text:{n}", text=str(r[text_col])) for n, r in enumerate(rows)
                     if r.get(text_col) is not None]
        else:
            raise EmbedkitError(f"--extra-texts '{path}' must be a folder of .txt files or a CSV/JSONL table")
        if not found:
            raise EmbedkitError(f"--extra-texts '{path}' holds no texts")
        out += found
    return out


def digest(image: np.ndarray) -> str:
    """Identity of an image as training sees it: its decoded, resized pixels."""
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


def reference_keys(pair_data: dict, val_rows: torch.Tensor, held_back: list[Item], cfg: SharedEncoderConfig,
                   grouped: bool) -> dict[str, set]:
    """Images, texts and groups no unpaired item may share: the held-out rows' and the held-back rows'."""
    val = val_rows.tolist()
    keys = {"images": {digest(pair_data["images"][i]) for i in pair_data["image_index"][val_rows].tolist()},
            "texts": {pair_data["texts"][i].strip() for i in val},
            "groups": {pair_data["groups"][i] for i in val} if grouped else set()}
    pre = image_preprocess(cfg)
    for path, dicom in {(str(it.image_path), it.dicom) for it in held_back if it.image_path is not None}:  # once
        try:
            keys["images"].add(digest(decode_image(path, pre, dicom=dicom)))
        except ImageDecodeError:
            pass  # an image that cannot be decoded cannot be matched either
    for it in held_back:
        text = read_item_text(it)[0] if it.has_text else None  # stripped, as the texts it is compared with
        if text is not None:
            keys["texts"].add(text)
        if grouped and it.group is not None:
            keys["groups"].add(str(it.group))
    keys["groups"].discard(None)
    return keys


def prepare_unpaired(unpaired: Unpaired, pair_data: dict, val_rows: torch.Tensor, cfg: SharedEncoderConfig,
                     tokenizer, grouped: bool) -> dict:
    """Decode/tokenise the usable unpaired items once; count what was used, left out and skipped.

    An image already among the pairs' (same pixels) is not added twice; one sharing an image, a text or
    a group with a held-out or held-back row is left out.
    """
    pre = image_preprocess(cfg)
    ref = reference_keys(pair_data, val_rows, unpaired.held_back, cfg, grouped)
    seen = {digest(im) for im in pair_data["images"]}
    images, texts, skipped, keys = [], [], [], []
    counts = {"offered_images": 0, "offered_texts": 0, "left_out_held_out_or_back": 0, "duplicate_images": 0}
    for it in unpaired.items:
        is_image = it.image_path is not None
        counts["offered_images" if is_image else "offered_texts"] += 1
        if grouped and it.group is not None and str(it.group) in ref["groups"]:
            counts["left_out_held_out_or_back"] += 1
            continue
        if is_image:
            try:
                im = decode_image(str(it.image_path), pre, dicom=it.dicom)
            except ImageDecodeError as e:
                skipped.append(SkippedInput(it.id, str(it.image_path), "decode", str(e)))
                continue
            key = digest(im)
            if key in ref["images"]:
                counts["left_out_held_out_or_back"] += 1
            elif key in seen:
                counts["duplicate_images"] += 1
            else:
                seen.add(key)
                images.append(im)
                keys.append("image " + key)
            continue
        text, reason = read_item_text(it)  # extract's own reading: UTF-8, stripped, the reason when unusable
        if text is None:
            skipped.append(SkippedInput(it.id, str(it.text_path or ""), "read", reason))
        elif text in ref["texts"]:
            counts["left_out_held_out_or_back"] += 1
        else:
            texts.append(text)
            keys.append("text " + hashlib.sha1(text.encode()).hexdigest())
    S = cfg.image_size
    ids, mask, n_truncated = (tokenize(tokenizer, texts, cfg.max_text_len, padding="max_length") if texts else
                              (torch.zeros(0, cfg.max_text_len, dtype=torch.long),) * 2 + (0,))
    return {
        "images": np.stack(images) if images else np.zeros((0, S, S, 3), np.uint8),
        "input_ids": ids,
        "attention_mask": mask,
        "n_truncated": n_truncated,
        "skipped": skipped,
        "counts": counts | {"used_images": len(images), "used_texts": len(texts)},
        # what a resumed run must find again: the same usable items, in any order
        "fingerprint": hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:16],
    }
