"""The comparison from start to end: inputs, estimate, grid, leaderboard, curve, raw, files. See __init__."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from embedkit.comparison.config import METRICS, CompareConfig
from embedkit.comparison.grid import (BASELINES, Configuration, Encoder, check_alignments, check_fusions, configurations,
                                   find_encoders, pick)
from embedkit.costs import load_average
from embedkit.errors import EmbedkitError

MARKER = "compare_plan.json"  # only a folder holding it (or a new or empty one) is used as a compare folder


def compare(data, out, config: CompareConfig, source=None, rows=None, extract_config=None):
    """Run the comparison into `out` (resuming a killed one) and return the leaderboard as a DataFrame.

    data: a data folder (extracted with `source`/`rows` as `extract` takes them, into OUT/emb) or one
    or more `embedkit extract` folders (a path or a list of paths)."""
    from embedkit.guards import check_writable_folder, folder_lock

    out = Path(out)
    if config.metric not in METRICS:
        raise EmbedkitError(f"--metric must be one of {', '.join(METRICS)}, got '{config.metric}'")
    if out.exists() and not out.is_dir():
        raise EmbedkitError(f"compare folder '{out}' is a file, not a folder")
    if out.is_dir() and any(p.name != ".compare.lock" for p in out.iterdir()) and not (out / MARKER).is_file():
        raise EmbedkitError(f"compare folder '{out}' holds files embedkit compare did not write (no {MARKER}); "
                            f"choose a new folder")
    check_writable_folder(out, "compare folder")
    with folder_lock(out / ".compare.lock", f"compare folder '{out}'"):
        return _compare(data, out, replace(config, out=str(out)), source, rows, extract_config)


def _compare(data, out: Path, cfg: CompareConfig, source, rows, extract_config):
    from embedkit.comparison.estimate import minutes
    from embedkit.console import say

    t_start = time.perf_counter()
    load_start = load_average()
    paths = [Path(p) for p in (data if isinstance(data, (list, tuple)) else [data])]
    inputs = _Inputs(paths, out, cfg, source, rows, extract_config)
    (out / MARKER).write_text(json.dumps({"data": [str(p) for p in paths], "config": asdict(cfg)}, indent=2,
                                         default=str))
    from embedkit.train import FUSIONS

    fusions = check_fusions(cfg.fusions or list(FUSIONS), FUSIONS)
    grid = configurations(inputs.pick("image", cfg.image_models), inputs.pick("text", cfg.text_models), fusions,
                          check_alignments(cfg.align))
    estimate = inputs.estimate(grid)
    say(f"estimated time: {minutes(estimate['total_s'])} (" + ", ".join(
        f"{k.replace('_s', '')} {minutes(v)}" for k, v in estimate["parts"].items() if v) +
        "; measured on this machine from a few items per encoder and a few epochs per head)")
    dropped = _apply_budget(cfg, grid, estimate, inputs)
    cfg = estimate.get("config", cfg)
    encoders_needed = {e for c in grid if c.reason is None and c not in dropped for e in (c.image, c.text) if e}
    if not encoders_needed:
        reasons = sorted({"dropped to fit --budget-minutes" if c in dropped else c.reason for c in grid
                          if c.fusion not in BASELINES})
        raise EmbedkitError(f"nothing to compare: every configuration was dropped or cannot run here "
                            f"({'; '.join(reasons)})")
    t_extract = time.perf_counter()
    inputs.extract(encoders_needed)
    extract_s = time.perf_counter() - t_extract
    grid = [inputs.final(c, dropped) for c in grid]
    result = _run_grid(out, cfg, grid, inputs)
    result["estimate"] = {k: v for k, v in estimate.items() if k != "config"}
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    result["timing"] = {"extraction_s": round(extract_s, 1), **result.pop("timing", {}),
                        "total_s": result["seconds"], "cores": os.cpu_count(),
                        "load_average": {"start": load_start, "end": load_average()}}
    say(f"took {minutes(result['seconds'])} (estimated {minutes(estimate['total_s'])}; the estimate leaves out "
        f"start-up and the statistics, and this machine's other load moves both)")
    from embedkit.comparison.report import write_outputs

    board = write_outputs(out, result)
    if not result["summary"].get("best"):  # only the baselines scored: nothing useful was learned
        raise EmbedkitError(f"no configuration could be trained on this data; the reasons are in "
                            f"{out / 'leaderboard.csv'} (column reason)")
    return board


class _Inputs:
    """The encoders of a comparison: found in embedding folders, or extracted from a data folder into OUT/emb."""

    def __init__(self, paths: list[Path], out: Path, cfg: CompareConfig, source, rows, extract_config):
        from embedkit.store import find_datasets

        self.cfg, self.out_emb = cfg, out / "emb"
        folders = [p for p in paths if p.is_dir() and find_datasets(p)]
        self.calibrated, self.specs, self.scan = {}, {}, None
        if folders and len(folders) == len(paths):  # embedding folders
            if source is not None or rows is not None:
                raise EmbedkitError("input options (--metadata, --manifest, ...) describe a data folder; these are "
                                    "embedding folders")
            self.extracting, self.encoders = False, find_encoders(folders)
            return
        if len(paths) != 1 or folders:
            raise EmbedkitError("give one data folder, or one or more `embedkit extract` folders (not a mix)")
        from embedkit.comparison.inputs import wanted_encoders
        from embedkit.extract import ExtractConfig
        from embedkit.items import SourceOptions
        from embedkit.sources import scan_source

        self.extracting, self.data = True, paths[0]
        self.extract_config = extract_config or ExtractConfig()
        source = source or SourceOptions()
        if source.dicom_salt_file is None:  # as extract keys DICOM pseudonyms: a salt kept in its --out
            from embedkit.dicom import SALT_FILE

            self.out_emb.mkdir(parents=True, exist_ok=True)
            source = replace(source, dicom_salt_file=self.out_emb / SALT_FILE)
        self.scan = scan_source(paths[0], source, rows=rows)
        self.specs = wanted_encoders(self.scan, cfg.image_models, cfg.text_models, self.extract_config)
        from embedkit.guards import encoder_identity, fingerprint
        from embedkit.store import dataset_dir

        self.encoders = [Encoder(m, name, dataset_dir(self.out_emb, m, name), int(spec.dim or 0),
                                 fingerprint(encoder_identity(spec, self.extract_config)))
                         for (m, name), spec in self.specs.items()]

    def pick(self, modality: str, wanted: list[str] | None) -> list[Encoder]:
        if self.extracting:  # already chosen (and checked) by wanted_encoders, in the order asked
            return [e for e in self.encoders if e.modality == modality]
        return pick(self.encoders, modality, wanted)

    def estimate(self, grid: list[Configuration]) -> dict:
        """Seconds per part and per configuration, measured here before the run."""
        from embedkit.comparison.estimate import calibrate_extraction, fit_seconds
        from embedkit.comparison.runner import SHIFT_SWEEP, train_config
        from embedkit.train import parse_sweep

        extract_s = {}
        if self.extracting:
            self.out_emb.mkdir(parents=True, exist_ok=True)
            for e in {e for c in grid for e in (c.image, c.text) if e}:
                cal = calibrate_extraction(self.data, self.out_emb, self.scan, self.specs[(e.modality, e.name)],
                                           e.modality, self.extract_config)
                self.calibrated[(e.modality, e.name)] = cal
                extract_s[e] = cal["seconds"]
        n, n_classes = self._size()
        runs = self.cfg.cv or self.cfg.seeds
        share_train = 1 - self.cfg.val_fraction - self.cfg.test_fraction
        train_s, cache = {}, {}
        for c in grid:
            if c.reason is not None or c.fusion in BASELINES:
                train_s[c] = 0.0
                continue
            dims = [self._dim(e) for e in (c.image, c.text) if e]
            key = (c.fusion, tuple(dims))
            if key not in cache:
                cache[key] = fit_seconds(train_config(self.cfg, c.fusion), dims, int(n * share_train),
                                         int(n * self.cfg.val_fraction), n_classes)
            candidates = len(parse_sweep(SHIFT_SWEEP)) if c.align == "shift" else 1
            train_s[c] = cache[key] * runs * candidates
        heaviest = sorted(train_s.values(), reverse=True)[:self.cfg.curve_top]
        curve_s = (sum(heaviest) / max(runs, 1) * self.cfg.curve_seeds * sum(self.cfg.curve_fractions)
                   if self.cfg.curve else 0.0)
        parts = {"extraction_s": sum(extract_s.values()), "training_s": sum(train_s.values()), "curve_s": curve_s}
        if self.cfg.raw:
            from embedkit.comparison.raw import estimate_raw

            parts["raw_s"] = estimate_raw(self.cfg, n, self.calibrated)
        return {"total_s": sum(parts.values()), "parts": parts, "per_config_s": train_s, "extract_s": extract_s}

    def _size(self) -> tuple[int, int]:
        """(labelled rows, classes), before anything is extracted."""
        if self.extracting:
            labels = [it.labels.get(self.cfg.label) for it in self.scan.items]
        else:
            from embedkit.store import read_embedding_table

            labels = read_embedding_table(self.encoders[0].folder).columns.get(self.cfg.label, [])
        labels = [v for v in labels if v is not None and v == v]
        if not labels:
            raise EmbedkitError(f"label column '{self.cfg.label}' is missing or empty in this data")
        return len(labels), max(2, len({str(v) for v in labels}))

    def _dim(self, e: Encoder) -> int:
        return int((self.calibrated.get((e.modality, e.name)) or {}).get("dim") or e.dim or 384)

    def extract(self, needed: set[Encoder]) -> None:
        """Extract the encoders still needed, then read every encoder back from its table."""
        from embedkit.comparison.inputs import extract_all, folder_costs

        if self.extracting:
            specs = {(e.modality, e.name): self.specs[(e.modality, e.name)] for e in self.encoders if e in needed}
            self.costs = extract_all(self.data, self.out_emb, self.scan, specs, self.extract_config, self.calibrated)
            self.found = {(e.modality, e.name): e for e in find_encoders([self.out_emb])}
        else:
            self.costs = folder_costs([e for e in self.encoders if e in needed])
            self.found = {(e.modality, e.name): e for e in self.encoders}

    def final(self, c: Configuration, dropped: list) -> Configuration:
        """The configuration with its encoders as extracted (their real fingerprints), or why it did not run."""
        if c in dropped:
            return replace(c, reason="dropped to fit --budget-minutes (among the most expensive)")
        if c.reason is not None:
            return c
        return replace(c, image=self.found.get(("image", c.image.name)) if c.image else None,
                       text=self.found.get(("text", c.text.name)) if c.text else None)


def _apply_budget(cfg: CompareConfig, grid: list[Configuration], estimate: dict, inputs: _Inputs) -> list:
    """Fit the estimate into --budget-minutes: raw first, then label efficiency, then configurations,
    the most expensive first. Says what was dropped."""
    from embedkit.comparison.estimate import drop_to_budget, minutes
    from embedkit.console import say

    if not cfg.budget_minutes:
        return []
    budget = cfg.budget_minutes * 60
    parts = estimate["parts"]
    for part, flag in (("raw_s", "raw"), ("curve_s", "curve")):
        if sum(parts.values()) > budget and parts.get(part):
            say(f"budget: {flag} step dropped (estimated {minutes(parts[part])})")
            cfg = replace(cfg, **{flag: False})
            parts[part] = 0.0
    estimate["config"] = cfg
    fixed = 0.0
    dropped = drop_to_budget(estimate["per_config_s"], estimate["extract_s"],
                             lambda c: [e for e in (c.image, c.text) if e], fixed, budget,
                             keep=[c for c in grid if c.fusion in BASELINES])
    for c in dropped:
        say(f"budget: dropped {c.name} (estimated {minutes(estimate['per_config_s'][c])} of training)")
    if dropped or sum(parts.values()) > budget:
        kept = [c for c in grid if c not in dropped]
        used = {e for c in kept for e in (c.image, c.text) if e}
        total = sum(estimate["per_config_s"][c] for c in kept) + sum(v for e, v in estimate["extract_s"].items()
                                                                    if e in used)
        say(f"budget: {len(dropped)} configuration(s) dropped; estimate now {minutes(total)} "
            f"(budget {minutes(budget)})")
    return dropped


def _run_grid(out: Path, cfg: CompareConfig, grid: list[Configuration], inputs: _Inputs) -> dict:
    """Every configuration on the shared splits (finished ones reused), then the leaderboard."""
    from embedkit.comparison.board import Scored, leaderboard, shared_resamples
    from embedkit.comparison.data import dataset_for, make_splits, shared_rows
    from embedkit.comparison.runner import (config_key, data_key, finished, not_run, read_predictions,
                                         run_configuration, train_config)
    from embedkit.console import progress_bar, say

    t_grid = time.perf_counter()
    runnable = [c for c in grid if c.reason is None]
    encoders = sorted({e for c in runnable for e in (c.image, c.text) if e}, key=lambda e: (e.modality, e.name))
    shared = shared_rows(encoders, cfg.label, cfg.group_col, cfg.groups)
    base_cfg = train_config(cfg)
    splits, seeds, purged = make_splits(shared, base_cfg)
    _write_splits(out / "splits.parquet", shared.ref.ids, splits)
    key_data = data_key(shared.ref, shared.groups, splits)
    say(f"rows: {len(shared.ref.ids)} shared by every configuration"
        + "".join(f", {v} left out ({k.replace('_', ' ')})" for k, v in shared.left_out.items() if v)
        + f"; groups: {shared.group_note}; {len(splits)} {'folds' if cfg.cv else 'seeds'}, "
          f"test rows per run: {', '.join(str(len(s['test'])) for s in splits)}")
    if any(purged.values()):
        say(f"note: left out of the data's split so that no group crosses it: {purged['train']} train and "
            f"{purged['val']} validation rows")
    leakage = _leakage_scan(shared, splits[0], cfg.label)
    scored, reused = [], 0
    with progress_bar(cfg.progress) as bar:
        task = bar.add_task("configurations", total=len(grid), rate="")
        for c in grid:
            folder = out / "configs" / c.slug
            key = config_key(c, train_config(cfg, c.fusion, c.align), key_data)
            result = finished(folder, key)
            if result is not None:
                reused += 1
            elif c.reason is not None:
                result = not_run(c, folder, key)
            else:
                bar.update(task, rate=c.name)
                ds = shared.ref if c.fusion in BASELINES else dataset_for(c, shared, cfg.label)
                result = run_configuration(c, ds, splits, seeds, train_config(cfg, c.fusion, c.align), folder, key,
                                           shared.groups)
            scored.append(Scored(result, read_predictions(folder, len(splits)) if result["status"] == "ok" else []))
            bar.update(task, advance=1)
    if reused:
        say(f"reused {reused} finished configuration(s) from an earlier run of this comparison")
    weights = shared_resamples(shared.ref, shared.groups, splits, cfg.bootstrap, cfg.seed)
    rows, summary = leaderboard(scored, shared.ref, splits, weights, cfg.metric, inputs.costs)
    result = {"config": asdict(cfg), "rows": rows, "summary": summary,
              "data": {"rows": int(len(shared.ref.ids)), "left_out": shared.left_out, "groups": shared.group_note,
                       "purged_rows": purged, "seeds": seeds, "data_key": key_data,
                       "splits": [{k: int(len(v)) for k, v in s.items()} for s in splits],
                       "test_groups": [int(len(set(shared.groups[s["test"]].tolist()))) if shared.groups is not None
                                       else int(len(s["test"])) for s in splits],
                       "splits_file": "splits.parquet", "leakage": leakage},
              "extraction": {f"{m}:{n}": v for (m, n), v in inputs.costs.items()},
              "configs": {r["config"]: s.result for r, s in zip(rows, _in_order(rows, scored))}}
    result["robustness"] = _robustness(rows, result["configs"], cfg.curve_top)
    result["timing"] = {"configurations_s": round(time.perf_counter() - t_grid, 1)}
    if cfg.curve and summary.get("best"):
        from embedkit.comparison.curve import label_efficiency

        t0 = time.perf_counter()
        result["curve"] = label_efficiency(cfg, rows, grid, shared, splits, seeds, weights, out)
        result["timing"]["curve_s"] = round(time.perf_counter() - t0, 1)
    if cfg.raw:
        from embedkit.comparison.raw import raw_rows

        t0 = time.perf_counter()
        result["raw"] = raw_rows(cfg, inputs, shared, splits, seeds, weights, scored, rows)
        result["timing"]["raw_s"] = round(time.perf_counter() - t0, 1)
    return result


def _leakage_scan(shared, idx: dict, label: str) -> dict | None:
    """Run 0's training texts scanned for words that give the label away (said once, before any training)."""
    if "text" not in shared.ref.columns:
        return None
    from embedkit.console import say
    from embedkit.fusion.evaluate import detect_task
    from embedkit.leakage import format_leakage, scan_text_leakage

    tr = idx["train"]
    y = shared.ref.y[tr]
    result = scan_text_leakage(shared.ref.columns["text"][tr].tolist(), y, detect_task(y), sorted(set(y.tolist())),
                               label_names=[label])
    for line in format_leakage(result, label):
        say(f"[yellow]{line}[/]")
    return result


def _robustness(rows: list[dict], configs: dict, top: int) -> dict:
    """Run 0's robustness curves of the best `top` configurations that see both modalities."""
    best = [r["config"] for r in rows if r["status"] == "ok" and r.get("image_model") and r.get("text_model")
            and configs[r["config"]]["runs"] and "robustness" in configs[r["config"]]["runs"][0]][:top]
    return {name: configs[name]["runs"][0]["robustness"] for name in best}


def _in_order(rows: list[dict], scored: list) -> list:
    by_name = {s.result["config"]: s for s in scored}
    return [by_name[r["config"]] for r in rows]


def _write_splits(path: Path, ids, splits: list[dict]) -> None:
    """id, run, split: the shared splits, so anyone can re-score a configuration on exactly these rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {"id": [], "run": [], "split": []}
    for run, idx in enumerate(splits):
        for name in ("train", "val", "test"):
            cols["id"] += [str(i) for i in ids[idx[name]]]
            cols["run"] += [run] * len(idx[name])
            cols["split"] += [name] * len(idx[name])
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.table({"id": pa.array(cols["id"], pa.string()), "run": pa.array(cols["run"], pa.int32()),
                             "split": pa.array(cols["split"], pa.string())}), tmp)
    tmp.replace(path)
