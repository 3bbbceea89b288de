"""The model card's judgements: limitations written from the run, and the TRIPOD+AI checklist.

limitations(card): sentences for what this run shows about itself - a small test set, wide
intervals, a score at chance, validation and test that disagree, classes or subgroups with too
few rows, leakage findings, inputs shared across the split, an uncalibrated model, backend parity
below 0.999, a collapsed shared space - each with its number, so a reader can check it.
tripod_checklist(card): the TRIPOD+AI items (Collins et al., BMJ 2024) that apply to a model of
this kind, each marked filled (with where), partly, or needs a person.
"""

from __future__ import annotations

import math

from embedkit.modelcard_sections import named

SMALL_TEST_ROWS = 100
SMALL_TEST_GROUPS = 30
WIDE_INTERVAL = 0.2
FEW_CLASS_ROWS = 10
PARITY_FLOOR = 0.999
COLLAPSED_COSINE = 0.95


def _finite(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def limitations(card) -> list[str]:
    m, info = card.metrics, card.info
    data = m.get("data") or {}
    n_test, g_test = (data.get("n") or {}).get("test", 0), (data.get("groups_per_split") or {}).get("test", 0)
    out = []
    unit = (m.get("bootstrap") or {}).get("unit", "row")
    if n_test < SMALL_TEST_ROWS or (unit == "group" and g_test < SMALL_TEST_GROUPS):
        out.append(f"Small test set: {n_test} rows from {g_test} {'groups' if unit == 'group' else 'rows'}; "
                   f"every test number is uncertain (see the intervals).")
    for k in ("macro_f1", "auroc"):
        b = card.interval(k)
        if b and _finite(b.get("low")) and b["high"] - b["low"] > WIDE_INTERVAL:
            out.append(f"Wide interval: test {k} 95% interval [{b['low']:.3f}, {b['high']:.3f}] spans "
                       f"{b['high'] - b['low']:.2f}.")
    for b in card.banners():
        out.append(b["message"])
    for c, s in ((m.get("test") or {}).get("per_class") or {}).items():
        if s.get("support", 0) < FEW_CLASS_ROWS:
            out.append(f"Class {named(c, card.names)} has {s['support']} test rows: its recall, precision and "
                       f"F1 rest on very few cases.")
    for col, values in (m.get("subgroups") or {}).items():
        small = [f"{v} ({e['n']})" for v, e in values.items() if e.get("small")]
        if small:
            out.append(f"Subgroups of {col} with too few test rows to judge: {', '.join(small)}.")
    if not m.get("subgroups"):
        out.append("No subgroup analysis: performance across sex, age, site or scanner is unknown.")
    leak = m.get("leakage") or {}
    found = [f"'{r['token']}' -> {r['class']}" for r in leak.get("rules", [])]
    found += [f"'{w['token']}' (a {w['source']} word)" for w in leak.get("label_words", [])]
    if found:
        out.append(f"Possible label leakage in the training texts: {', '.join(found[:6])}; a text that states "
                   f"the outcome makes the score say little about cases where it is written before the outcome "
                   f"is known.")
    for note in card.dataset.get("leakage_notes") or []:
        out.append(f"Data manifest: {note}")
    shared = data.get("test_rows_sharing_inputs_with_train") or {}
    if shared:
        out.append("Test rows with an input identical to a training row's: "
                   + ", ".join(f"{v} ({m_})" for m_, v in shared.items()) + "; they are not independent cases.")
    ungrouped = data.get("ungrouped")
    if ungrouped:
        out.append(f"Trained with --no-groups: {ungrouped['test_rows_in_groups_seen_in_training']} of "
                   f"{ungrouped['test_rows']} test rows belong to groups that also have training rows.")
    cal = m.get("calibration") or {}
    if cal and not (cal.get("calibrated_on") or {}).get("fitted_on"):
        out.append("Probabilities are not temperature-scaled: "
                   + (cal.get("calibrated_on") or {}).get("note", "calibration was turned off") + ".")
    for mod, p in (info.get("encoders") or {}).items():
        parity = p.get("parity_min_cosine")
        if _finite(parity) and parity < PARITY_FLOOR:
            out.append(f"The {mod} encoder ran on {p.get('backend')} {p.get('precision')} with minimum cosine "
                       f"{parity:.4f} to torch fp32 (below {PARITY_FLOOR}): embeddings differ from the reference.")
    for mod, cos in (data.get("mean_within_cosine") or {}).items():
        if _finite(cos) and cos > COLLAPSED_COSINE:
            out.append(f"The {mod} embeddings are nearly collapsed: two different training rows have cosine "
                       f"{cos:.3f} on average, so they barely differ.")
    return out


# (item, topic, how the card fills it): "filled" + where, "partly" + where, or "person"
TRIPOD_ITEMS = (
    ("1", "Title", "partly", "Model card title; the paper's title must say development and/or evaluation"),
    ("2", "Abstract", "person", ""),
    ("3", "Background: healthcare context, rationale", "person", ""),
    ("4", "Objectives (development and/or evaluation)", "intended_use", "Intended use"),
    ("5", "Data sources and dates", "data", "Data"),
    ("6", "Participants: setting, eligibility", "setting", "Data: setting and population"),
    ("7", "Data preparation", "filled", "Predictors (encoder provenance, preprocessing), Flow of rows"),
    ("8", "Outcome definition and assessment", "outcome", "Data: outcome definition"),
    ("9", "Predictors: choice, definition, measurement", "filled", "Predictors"),
    ("10", "Sample size", "partly", "Flow of rows (rows and groups per split); the justification needs a person"),
    ("11", "Missing data", "filled", "Flow of rows (rows without a label left out and counted)"),
    ("12", "Analytical methods: splits, model, tuning, internal validation, performance measures", "filled",
     "Flow of rows, Evaluation (choices on validation, test once, grouped bootstrap)"),
    ("13", "Class imbalance", "filled", "Predictors (class weights); Operating point (threshold chosen on validation)"),
    ("14", "Fairness", "subgroups", "Subgroups"),
    ("15", "Model output and decision thresholds", "filled", "Model details (decision rule), Operating point"),
    ("16", "Training versus evaluation setting", "person", ""),
    ("17", "Ethical approval", "ethics", "Licence and citation"),
    ("18", "Open science: funding, conflicts, protocol, registration, data and code", "partly",
     "Licence and citation (data licence and homepage, embedkit version and configuration); funding, protocol and "
     "registration need a person"),
    ("19", "Patient and public involvement", "person", ""),
    ("20", "Participants: flow, characteristics", "filled", "Flow of rows, Prevalence per split"),
    ("21", "Model development: participants and outcome events per analysis", "filled",
     "Flow of rows, Prevalence per split"),
    ("22", "Model specification", "filled", "Model details, Predictors (the model folder holds the weights)"),
    ("23", "Model performance with confidence intervals; heterogeneity across subgroups", "subgroups_perf",
     "Evaluation, Operating point, Calibration, Subgroups"),
    ("24", "Model updating (recalibration)", "filled", "Calibration"),
    ("25", "Interpretation", "person", ""),
    ("26", "Limitations", "partly", "Limitations (from the run; a person adds what the run cannot see)"),
    ("27", "Usability in context: intended users, handling poor-quality or missing input", "partly",
     "Intended use, Out-of-scope use; missing modalities are handled only when trained with --align"),
)


def tripod_checklist(card) -> list[list[str]]:
    rows = []
    for item, topic, how, where in TRIPOD_ITEMS:
        if how == "person":
            status, where = "needs a person", "card.toml or the paper"
        elif how in ("filled", "partly"):
            status = how
        elif how == "data":
            status = "filled" if card.dataset.get("manifest") else "partly"
            where = where if status == "filled" else f"{where} (no data manifest recorded: describe the source)"
        elif how == "subgroups":
            status = "partly" if card.metrics.get("subgroups") else "needs a person"
        elif how == "subgroups_perf":
            status = "filled" if card.metrics.get("subgroups") else "partly"
        else:  # a card.toml field
            status = "filled" if card.person.get(how) else "needs a person"
            where = where if status == "filled" else f"card.toml: {how}"
        rows.append([item, topic, status, where])
    return rows
