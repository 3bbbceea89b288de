"""What a comparison compares: encoders already extracted into folders, or a data folder that it extracts
once per encoder (extract's own cache, resume and identity rules), and what each extraction cost."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from embedkit.errors import EmbedkitError

COSTS_FILE = "extract_costs.json"  # in the comparison's embedding folder: what each extraction measured


def offline_encoders(modality: str) -> list[str]:
    """Every registry encoder of this modality that loads here without a network (`embedkit models`)."""
    from embedkit.encoders.registry import list_models

    return [r["name"] for r in list_models() if r["available"] and modality in r["modalities"].split("+")]


def resolve_encoder(name: str, modality: str, extract_config):
    """The spec of an encoder the user named, or a one-line error that lists what is available here."""
    from embedkit.encoders.registry import model_available, resolve_spec

    available = ", ".join(offline_encoders(modality)) or "none"
    try:
        spec = resolve_spec(name, modality, trust_remote_code=extract_config.trust_remote_code)
    except EmbedkitError as e:
        raise EmbedkitError(f"{modality} encoder '{name}': {e}; available here: {available} (or a local model "
                            f"folder)") from None
    ok, where = model_available(spec)
    if not ok:
        raise EmbedkitError(f"{modality} encoder '{name}' is not on this machine ({where}); available here: "
                            f"{available}")
    return spec


def wanted_encoders(scan, image_models: list[str] | None, text_models: list[str] | None, extract_config) -> dict:
    """{(modality, name): spec} for the modalities the data has; the default is every offline encoder."""
    counts = scan.counts()
    out = {}
    for modality, names, present in (("image", image_models, counts["images"]), ("text", text_models, counts["texts"])):
        if names is None:
            names = offline_encoders(modality) if present else []
        elif names and not present:
            raise EmbedkitError(f"--{modality}-models given but the data has no {modality}s")
        for name in names:
            spec = resolve_encoder(name, modality, extract_config)
            out[(modality, spec.name)] = spec
    if not out:
        raise EmbedkitError("nothing to compare: the data has no images or texts an available encoder can embed")
    return out


def extract_all(data: Path, out_emb: Path, scan, specs: dict, extract_config, calibrated: dict) -> dict:
    """Extract every encoder into out_emb (resuming what calibration or an earlier run embedded);
    returns {(modality, name): cost record}, kept in out_emb/extract_costs.json for later reruns."""
    from embedkit.costs import reset_peak_rss
    from embedkit.extract import extract
    from embedkit.costs import dir_bytes

    known = read_costs(out_emb)
    costs = {}
    for (modality, name), spec in specs.items():
        config = replace(extract_config, image_model=name if modality == "image" else None,
                         text_model=name if modality == "text" else None)
        reset_peak_rss()
        res = extract(data, out_emb, config, scan=scan).modalities[modality]
        key = f"{modality}:{name}"
        cal = calibrated.get((modality, name)) or {}
        embedded = res.unique_inputs_embedded + cal.get("embedded", 0)  # per input embedded (shared files once)
        if embedded:  # what this comparison embedded, calibration included
            load = res.costs.get("stage_seconds", {}).get("load_model", 0.0) if res.rows_embedded else 0.0
            busy = (res.costs.get("wall_seconds", 0.0) - load if res.rows_embedded else 0.0) + cal.get("busy_s", 0.0)
            costs[key] = {"s_per_item": round(busy / embedded, 5), "load_s": round(load or cal.get("load_s", 0.0), 2),
                          "seconds": round(busy + load, 2), "items": embedded,
                          "peak_rss_mb": max(res.costs.get("peak_rss_mb") or 0.0, cal.get("peak_rss_mb") or 0.0),
                          "fingerprint": res.provenance.get("encoder_fingerprint")}
        elif key in known and known[key].get("fingerprint") == res.provenance.get("encoder_fingerprint"):
            costs[key] = known[key]  # measured by the run that embedded these rows
        else:
            costs[key] = {"s_per_item": None, "note": "embedded before this comparison: not measured"}
        costs[key]["stored_bytes"] = dir_bytes(Path(res.dataset))
    (out_emb / COSTS_FILE).write_text(json.dumps(known | costs, indent=2))
    return {tuple(k.split(":", 1)): v for k, v in costs.items()}


def read_costs(folder: Path) -> dict:
    try:
        return json.loads((folder / COSTS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def folder_costs(encoders) -> dict:
    """Extraction costs of encoders extracted beforehand: from their folder's extract_costs.json or
    manifest.json where the run that embedded them recorded them; stored bytes always."""
    from embedkit.costs import dir_bytes

    out = {}
    for e in encoders:
        root = e.folder.parent
        rec = read_costs(root).get(f"{e.modality}:{e.name}")
        if rec is None:
            try:
                m = json.loads((root / "manifest.json").read_text())["modalities"][e.modality]
                if m.get("model") == e.name and m.get("rows_embedded"):
                    c = m["costs"]
                    load = c.get("stage_seconds", {}).get("load_model", 0.0)
                    rec = {"s_per_item": round((c["wall_seconds"] - load) / m["rows_embedded"], 5),
                           "peak_rss_mb": c.get("peak_rss_mb"), "seconds": c["wall_seconds"],
                           "items": m["rows_embedded"]}
            except (OSError, ValueError, KeyError, TypeError):
                rec = None
        rec = dict(rec or {"s_per_item": None, "note": "not recorded with these embeddings"})
        rec["stored_bytes"] = dir_bytes(e.folder)
        out[(e.modality, e.name)] = rec
    return out
