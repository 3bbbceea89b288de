"""The model card's sections, as blocks (modelcard.py renders them as markdown and as HTML).

A block is ("h2", text), ("h3", text), ("p", text), ("list", [items]) or ("table", columns, rows,
note). Every number comes from metrics.json or embedkit_model.json as train wrote them, and every
table says which rows it was computed on.
"""

from __future__ import annotations

import math

TEST_ROWS = "test rows of the saved model (run 0), scored once"
TO_BE_FILLED = "to be filled"


def named(c, names: dict) -> str:
    """A class as a reader sees it: '1 (yes)', or the class itself when it has no other name."""
    name = names.get(str(c))
    return f"{c} ({name})" if name and name != str(c) else str(c)


def num(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def ci(b: dict | None, n_rows: int | None = None) -> str:
    """An interval as the card shows it: 'too wide to tell' / 'too few rows to tell' where it is (adequacy.py)."""
    if not b:
        return "-"
    from embedkit.fusion.adequacy import interval

    return interval(b.get("low"), b.get("high"), n_rows)


def sections(card) -> list[tuple]:
    return [*_details(card), *_uses(card), *_data(card), *_flow(card), *_predictors(card), *_evaluation(card),
            *_operating_point(card), *_calibration(card), *_combinations(card), *_subgroups(card), *_costs(card), *_warnings(card),
            *_licence(card)]


def _details(card) -> list[tuple]:
    info, m = card.info, card.metrics
    cfg = m.get("config") or {}
    classes = ", ".join(named(c, card.names) for c in info.get("classes", []))
    return [("h2", "Model details"), ("table", ["", ""], [
        ["model", card.person.get("title") or card.name],
        ["version", card.person_field("version")],
        ["task", f"{info.get('task')} classification of {', '.join(info.get('labels', []))}"],
        ["classes", classes + ("" if card.names else " (no class names given: --class-names 0=no,1=yes)")],
        ["model type", f"{info.get('fusion')} fusion of {' + '.join(info.get('modalities', []))} embeddings "
                       f"(frozen encoders; a small classifier trained by embedkit)"],
        ["decision rule", ((m.get("clinical") or {}).get("operating_point") or {}).get("rule", "-")],
        ["authors", card.person_field("authors")],
        ["contact", card.person_field("contact")],
        ["built with", f"embedkit {card.version or '-'}, seed {cfg.get('seed')}, "
                       f"{(m.get('spread') or {}).get('n_runs', 1)} run(s)"],
    ], "")]


def _uses(card) -> list[tuple]:
    return [("h2", "Intended use"), ("p", card.person_field("intended_use")),
            ("h2", "Out-of-scope use"), ("p", card.person_field("out_of_scope_use")
                                        if card.person.get("out_of_scope_use") else
                                        f"{TO_BE_FILLED_SENTENCE} Until then: not for clinical decisions about "
                                        f"individual patients; not outside the data's setting.")]


TO_BE_FILLED_SENTENCE = "To be filled by the authors (card.toml: out_of_scope_use)."


def _data(card) -> list[tuple]:
    d, info = card.dataset, card.info
    label_info = [(lab, (d.get("labels") or {}).get(lab) or {}) for lab in info.get("labels", [])]
    described = "; ".join(f"{lab}: {li['description']}" for lab, li in label_info if li.get("description"))
    outcome = card.person.get("outcome") or (f"{described} (from the data manifest; card.toml: outcome)" if described
                                             else f"{TO_BE_FILLED} (card.toml: outcome)")
    rows = [["source", (f"data manifest '{d['manifest']}': {d.get('description', '')}" if d.get("manifest")
                        else "a local folder (no data manifest recorded; describe it in card.toml: setting)")],
            ["setting and population", card.person_field("setting")],
            ["outcome (label) definition", outcome]]
    if d.get("license"):
        rows.append(["data licence", f"{d['license']} (access: {d.get('access', '-')})"])
    if d.get("citation"):
        rows.append(["data citation", d["citation"]])
    if d.get("homepage"):
        rows.append(["data homepage", d["homepage"]])
    if d.get("split"):
        rows.append(["recommended split", d["split"]])
    out = [("h2", "Data"), ("table", ["", ""], rows, "")]
    if d.get("leakage_notes"):
        out += [("h3", "What the data manifest says leaks"), ("list", d["leakage_notes"])]
    return out


def _flow(card) -> list[tuple]:
    data = card.metrics.get("data") or {}
    n, groups = data.get("n") or {}, data.get("groups_per_split") or {}
    purged = data.get("purged_rows") or {}
    rows_in = (data.get("rows") or 0) + (data.get("dropped_unlabelled") or 0)
    used = sum(n.values()) if n else 0
    rows = [["rows with embeddings (joined across modalities)", num(rows_in), ""],
            ["left out: no label", num(data.get("dropped_unlabelled") or 0), ""],
            ["left out: their group also has later-split rows (purged)",
             num(sum(purged.values())), f"train {num(purged.get('train', 0))}, validation {num(purged.get('val', 0))}"],
            ["left out of run 0's splits otherwise", num(max(0, (data.get("rows") or 0) - used - sum(purged.values()))),
             "a class with a single row or group stays in train only; the rest are the purged rows above"],
            *[[f"{k} rows (groups)", f"{num(n.get(k))} ({num(groups.get(k))})", _split_use(k)]
              for k in ("train", "val", "test")]]
    combos = data.get("combinations") or {}
    if any(len(v) > 1 for v in combos.values()):  # rows lacking a modality were kept (fusion/missing.py)
        rows.append(["rows lacking a modality (kept)", "; ".join(
            f"{k}: " + ", ".join(f"{c} only {num(v)}" for c, v in combos[k].items() if "+" not in c) for k in combos),
            "taken by the model's learned missing token, masking or the aligner's stand-in"])
    shared = data.get("test_rows_sharing_inputs_with_train") or {}
    if shared:
        rows.append(["test rows with an input identical to a training row's",
                     ", ".join(f"{m} {v}" for m, v in shared.items()), "not independent of training"])
    note = (f"Split: {data.get('split')}. Groups: {data.get('groups')}. A group (a patient, an image) never "
            f"has rows on two sides of a split.")
    return [("h2", "Flow of rows"), ("table", ["step", "rows", "note"], rows, note), *_prevalence(card)]


def _split_use(k: str) -> str:
    return {"train": "fitted on", "val": "choices: epoch, alignment, threshold" + " (and temperature, when large)",
            "test": "scored once per run, after every choice"}[k]


def _prevalence(card) -> list[tuple]:
    prev = (card.metrics.get("clinical") or {}).get("prevalence") or {}
    if not prev:
        return []
    classes = [c for c in next(iter(prev.values())) if c != "n"]
    rows = [[k, num(v.get("n")), *[num(v.get(c)) for c in classes]] for k, v in prev.items()]
    return [("h3", "Prevalence per split"),
            ("table", ["split", "rows", *[f"share {named(c, card.names)}" for c in classes]], rows,
             "Each class's share of the rows of each split (run 0).")]


def _predictors(card) -> list[tuple]:
    info, m = card.info, card.metrics
    rows = []
    for mod, p in (info.get("encoders") or {}).items():
        rows.append([mod, p.get("name"), p.get("source") or "-", p.get("revision") or "-", p.get("dim"),
                     p.get("pooling") or "-", f"{p.get('backend') or 'torch'} {p.get('precision') or ''}".strip()])
    a = m.get("alignment") or {}
    cfg = m.get("config") or {}
    note = ("Predictors are the embeddings of frozen encoders, whose provenance (weights fingerprint, "
            "preprocessing, pooling) the embedding folder records; the classifier uses the "
            f"{' + '.join(info.get('modalities', []))} embeddings"
            + (f", aligned by {a.get('method')} (lambda {a.get('lambda')})" if a else "")
            + f"; input scale {cfg.get('scale') or 'standard (fitted on training rows)'}; class weights "
              f"{cfg.get('class_weight') or 'none'}.")
    return [("h2", "Predictors"), ("table", ["modality", "encoder", "source", "revision", "dim", "pooling",
                                             "backend"], rows, note)]


def _evaluation(card) -> list[tuple]:
    m = card.metrics
    test, val = m.get("test") or {}, m.get("val") or {}
    chance = ((m.get("clinical") or {}).get("chance") or {}).get("test") or {}
    from embedkit.fusion.clinical import chance_verdict

    from embedkit.fusion.adequacy import MIN_TEST_ROWS, number, why_undefined

    n_test, n_val = (((m.get("data") or {}).get("n") or {}).get(k) for k in ("test", "val"))
    rows = []
    for k in ("accuracy", "macro_f1", "weighted_f1", "auroc", "ece"):
        if k not in test:
            continue
        verdict = chance_verdict(card.interval(k), chance.get(k)) if k != "ece" else None
        rows.append([k, number(test.get(k), why_undefined(k, test)), ci(card.interval(k), n_test),
                     number(val.get(k), why_undefined(k, val)), ci(card.interval(k, "bootstrap_val"), n_val),
                     num(chance.get(k)) if k in chance else "-",
                     "too few rows to tell" if n_test is not None and n_test < MIN_TEST_ROWS and verdict else
                     {"above": "above chance", "covers": "cannot tell", "below": "below chance"}.get(verdict, "-")])
    boot = m.get("bootstrap") or {}
    note = (f"Test: {TEST_ROWS}. Intervals: 95% percentile bootstrap over {boot.get('n_units', '-')} test "
            f"{boot.get('unit', 'row')}s, {boot.get('n_resamples', 0)} resamples, stratified by class"
            + (f"; {boot['resamples_lacking_a_class']} resamples lacked a class (scored 0)"
               if boot.get("resamples_lacking_a_class") else "")
            + f". Chance: {chance.get('note', 'AUROC 0.5')}.")
    out = [("h2", "Evaluation"),
           ("table", ["metric", "test", "95% interval", "validation", "validation interval", "chance / majority",
                      "verdict"], rows, note)]
    spread = m.get("spread") or {}
    if spread.get("n_runs", 1) > 1:
        srows = [[k, num(s["mean"]), num(s["std"]), f"[{num(s['ci95_low'])}, {num(s['ci95_high'])}]",
                  f"{s['n_runs']} of {s.get('of_runs', spread['n_runs'])}"]
                 for k, s in (spread.get("test") or {}).items() if k != "n"]
        out += [("h3", f"Spread over {spread['n_runs']} {spread['over']}"),
                ("table", ["metric", "mean", "std", "95% t interval (clipped to [0, 1])", "runs where defined"], srows,
                 "Each run: its own split (or fold), choices on its validation rows, its test rows scored once.")]
    return out


def _operating_point(card) -> list[tuple]:
    from embedkit.fusion.clinical import RATES, useful_range
    clin = card.metrics.get("clinical") or {}
    op = clin.get("operating_point")
    if not op:
        return []
    rows = []
    for c, v in op["classes"].items():
        iv = v.get("intervals") or {}
        rows.append([named(c, card.names), *[f"{num(v[r])} {ci(iv.get(r))}".strip() for r in RATES],
                     f"{v['tp']}/{v['fp']}/{v['fn']}/{v['tn']}", num(v["prevalence"])])
    out = [("h2", "Operating point"),
           ("table", ["class" if card.info.get("task") != "binary" else "positive class", "sensitivity",
                      "specificity", "PPV", "NPV", "TP/FP/FN/TN", "prevalence"], rows,
            f"Decision rule: {op['rule']}" + (" (one-vs-rest per class)" if card.info.get("task") == "multiclass"
                                              else "") + f"; {TEST_ROWS}; 95% bootstrap intervals over test "
            f"{op['unit']}s. PPV and NPV depend on prevalence: at another clinic's prevalence they differ.")]
    dc = clin.get("decision_curve")
    if dc:
        span = useful_range(dc)
        out += [("h3", "Net benefit (decision curve)"),
                ("p", "On the test rows, the model's net benefit is above both treat-all and treat-none for threshold "
                      f"probabilities {num(span[0], 2)} to {num(span[1], 2)} (not necessarily at every one between)"
                      + ("; with its test intervals covering chance, this is no evidence of benefit."
                         if any(b["kind"] == "chance" for b in card.banners()) else ".")
                 if span else "On the test rows, the model's net benefit is above treat-all and treat-none at no "
                              "threshold probability: acting on it would do no better than treating everyone or no one.")]
    return out


def _calibration(card) -> list[tuple]:
    cal = card.metrics.get("calibration") or {}
    if not cal:
        return []
    on = cal.get("calibrated_on") or {}
    iv = cal.get("ece_interval") or {}
    rows = [["temperature", num(cal.get("temperature")), on.get("note", "not fitted (--no-calibrate)")],
            ["decision threshold", num(cal.get("threshold")), f"rule {cal.get('threshold_rule')}, chosen on validation"],
            ["test ECE before scaling", f"{num((cal.get('ece_before') or {}).get('test'))} {ci(iv.get('test_before'))}",
             TEST_ROWS],
            ["test ECE after scaling", f"{num((cal.get('ece_after') or {}).get('test'))} {ci(iv.get('test_after'))}",
             TEST_ROWS],
            ["validation ECE before / after", f"{num((cal.get('ece_before') or {}).get('val'))} / "
                                              f"{num((cal.get('ece_after') or {}).get('val'))}", "validation rows"]]
    return [("h2", "Calibration"), ("table", ["", "value", "rows / how"], rows,
                                    "ECE: expected calibration error, 10 equal-width bins of the predicted class's "
                                    "confidence; 0 is perfect. Never fitted on test rows.")]


def _combinations(card) -> list[tuple]:
    from embedkit.fusion.combinations import COMBINATION_COLUMNS, combination_rows

    rows = combination_rows(card.metrics.get("by_combination"))
    if not rows:
        return []
    return [("h2", "By modality combination"), ("table", list(COMBINATION_COLUMNS), rows,
                                                f"Each combination's own {TEST_ROWS} (the modalities each row really "
                                                "had). ECE before any temperature, with the shared temperature, and "
                                                "as applied (its own temperature where its calibration rows were "
                                                "enough, else the shared one).")]


def _subgroups(card) -> list[tuple]:
    sub = card.metrics.get("subgroups") or {}
    if not sub:
        return [("h2", "Subgroups"), ("p", "No subgroup was evaluated (train --subgroup-col COLUMN, e.g. sex, site); "
                                          "performance across patient groups is unknown.")]
    rows = []
    for col, values in sub.items():
        for value, e in values.items():
            rows.append([f"{col} = {value}", e["n"], e.get("n_groups"), num(e["metrics"]["macro_f1"]),
                         ci(e["bootstrap"].get("macro_f1")), "too few rows: unreliable" if e.get("small") else ""])
    return [("h2", "Subgroups"), ("table", ["subgroup", "rows", "groups", "macro-F1", "95% interval", ""], rows,
                                  f"Each subgroup's own {TEST_ROWS}; intervals resample its groups.")]


def _costs(card) -> list[tuple]:
    c = card.metrics.get("costs") or {}
    return [("h2", "Costs"), ("table", ["", "value"], [
        ["training (seconds, run 0)", num(c.get("train_seconds"))],
        ["prediction of the test rows (seconds)", num(c.get("predict_seconds"), 4)],
        ["peak memory (MB)", num(c.get("peak_rss_mb"), 0)],
        ["classifier size (bytes)", num(c.get("model_bytes"))]], "Measured by embedkit train on this machine.")]


def _warnings(card) -> list[tuple]:
    w = card.metrics.get("warnings") or []
    return [("h2", "Warnings raised during the run"), ("list", w or ["none"])]


def _licence(card) -> list[tuple]:
    d = card.dataset
    return [("h2", "Licence and citation"), ("table", ["", ""], [
        ["model licence", card.person_field("license")],
        ["how to cite the model", card.person_field("citation")],
        ["data licence", d.get("license") or TO_BE_FILLED],
        ["data citation", d.get("citation") or TO_BE_FILLED],
        ["funding, conflicts", card.person_field("funding")],
        ["ethical approval", card.person_field("ethics")]], "")]

