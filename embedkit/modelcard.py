"""The model card: what a committee, an ethics board or a journal reads about a trained model.

`train` writes MODEL/model_card.md: YAML front matter in the Hugging Face model-card format
(license, datasets, tags, a `model-index` with the test metrics and their intervals, and an
`embedkit` block with the operating point, prevalence and calibration) and markdown sections
after it. `embedkit report MODEL` renders the same card as HTML: one list of blocks (headings,
paragraphs, tables, banners) feeds both renderers, so the two never say different things.

What embedkit knows it fills: the data source (the data manifest extract recorded), encoders
and their provenance, splits and the flow of rows, metrics with intervals, the operating
point, calibration, subgroups, costs, the warnings raised during the run, limitations written
from the run (modelcard_checks.py) and the TRIPOD+AI checklist. What only a person knows comes
from a small card.toml (`--card FILE`, keys in PERSON_FIELDS) or reads "to be filled".
MODEL/card.json keeps those inputs so that the report renders the card exactly as train wrote it.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

from embedkit.errors import EmbedkitError
from embedkit.modelcard_checks import limitations, tripod_checklist
from embedkit.modelcard_sections import TO_BE_FILLED, named, sections

PERSON_FIELDS = {
    "title": "the model's name as it should be cited",
    "intended_use": "what the model is for: the decision it supports, for whom, where",
    "out_of_scope_use": "uses it must not be put to",
    "outcome": "the outcome (label) definition: how and when it was assessed",
    "setting": "the clinical setting and population the data come from, with dates",
    "authors": "who built it (a string or a list)",
    "contact": "whom to ask",
    "license": "the model's licence (an SPDX id such as apache-2.0, or 'other')",
    "citation": "how to cite the model",
    "version": "the model's version",
    "funding": "funding and conflicts of interest",
    "ethics": "ethical approval (committee, reference)",
}
CARD_METRICS = (("accuracy", "accuracy"), ("macro_f1", "f1"), ("weighted_f1", "f1"), ("auroc", "roc_auc"),
                ("ece", "expected_calibration_error"))


# ---------------------------------------------------------------- inputs


def read_card_toml(path) -> dict:
    """The person-written fields of card.toml; an unknown key or a non-string value is an error."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    path = Path(path)
    if not path.is_file():
        raise EmbedkitError(f"--card: no file '{path}'")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise EmbedkitError(f"--card: '{path}' is not valid TOML ({e})") from None
    unknown = sorted(set(data) - set(PERSON_FIELDS))
    if unknown:
        raise EmbedkitError(f"--card: unknown key(s) {', '.join(unknown)} in '{path}'; the card takes: "
                            f"{', '.join(PERSON_FIELDS)}")
    for k, v in data.items():
        if k == "authors" and isinstance(v, list) and all(isinstance(a, str) for a in v):
            continue
        if not isinstance(v, str):
            raise EmbedkitError(f"--card: '{k}' in '{path}' must be a string")
    return data


def parse_class_names(spec: str | None) -> dict[str, str]:
    """'0=no,1=yes' -> {"0": "no", "1": "yes"}."""
    out = {}
    for part in (p.strip() for p in (spec or "").split(",") if p.strip()):
        key, sep, name = part.partition("=")
        if not sep or not key.strip() or not name.strip():
            raise EmbedkitError(f"--class-names wants CLASS=NAME pairs separated by commas, e.g. 0=no,1=yes "
                                f"(got '{part}')")
        out[key.strip()] = name.strip()
    return out


def dataset_of(emb_dir) -> dict | None:
    """What the data manifest said of the data, as extract recorded it in EMB/manifest.json (None without one)."""
    path = Path(emb_dir) / "manifest.json" if emb_dir is not None else None
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get("dataset")
    except (json.JSONDecodeError, OSError, AttributeError):
        return None


def class_names_for(info: dict, dataset: dict | None, given: dict | None = None) -> dict[str, str]:
    """Class -> meaning: --class-names first, then what train saved, then the manifest's label derivation."""
    names = {}
    for label in info.get("labels", []):
        names.update(((dataset or {}).get("labels", {}).get(label) or {}).get("class_names") or {})
    names.update(info.get("class_names") or {})
    names.update(given or {})
    known = {str(c) for c in info.get("classes", [])}
    unknown = sorted(set(given or {}) - known)
    if unknown:
        raise EmbedkitError(f"--class-names names {', '.join(unknown)}, not classes of this model "
                            f"({', '.join(sorted(known))})")
    return {k: v for k, v in names.items() if k in known}


# ---------------------------------------------------------------- the card as blocks


class Card:
    """Everything the card shows, from a model folder's files: metrics, model info, data, person fields."""

    def __init__(self, name: str, metrics: dict, info: dict, dataset: dict | None = None,
                 person: dict | None = None, class_names: dict | None = None):
        self.name, self.metrics, self.info = name, metrics, info
        self.dataset, self.person = dataset or {}, person or {}
        self.names = class_names_for(info, dataset, class_names)
        self.version = None  # embedkit's version when the card was written

    @classmethod
    def from_folder(cls, folder, card_path=None, class_names: dict | None = None, name: str | None = None) -> "Card":
        folder = Path(folder)
        metrics = json.loads((folder / "metrics.json").read_text())
        info_path = folder / "embedkit_model.json"
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        saved = json.loads((folder / "card.json").read_text()) if (folder / "card.json").is_file() else {}
        person = {**(saved.get("person") or {}), **(read_card_toml(card_path) if card_path else {})}
        card = cls(name or folder.name, metrics, info, saved.get("dataset"), person, class_names)
        card.version = saved.get("embedkit_version")
        return card

    def person_field(self, key: str) -> str:
        v = self.person.get(key)
        if isinstance(v, list):
            v = ", ".join(v)
        return v or TO_BE_FILLED

    def interval(self, key: str, where: str = "bootstrap") -> dict | None:
        return ((self.metrics.get(where) or {}).get("metrics") or {}).get(key)

    def banners(self) -> list[dict]:
        from embedkit.fusion.clinical import banners

        return banners(self.metrics)

    def blocks(self) -> list[tuple]:
        out = [("h1", f"Model card: {self.person.get('title') or self.name}")]
        out += [("banner", b["kind"], b["message"], b["title"]) for b in self.banners()]
        out += sections(self)
        out += [("h2", "Limitations (written from this run; a person should add what the run cannot see)"),
                ("list", limitations(self) or ["none detected from the run"])]
        out += [("h2", "TRIPOD+AI checklist"),
                ("table", ["item", "topic", "status", "where"], tripod_checklist(self),
                 "TRIPOD+AI (Collins et al., BMJ 2024;385:e078378): the items that apply to a model of this kind. "
                 "'filled': this card holds it; 'partly': the card holds what the run knows; 'needs a person': "
                 "only the authors can write it (card.toml or the paper).")]
        return out

    def front_matter(self) -> dict:
        """The Hugging Face model-card metadata (model-index with intervals) plus an `embedkit` block."""
        m, info = self.metrics, self.info
        boot = m.get("bootstrap") or {}
        what = (f"95% percentile bootstrap over {boot.get('n_units')} test {boot.get('unit')}s, "
                f"{boot.get('n_resamples')} resamples") if boot else None
        results = []
        for key, hf_type in CARD_METRICS:
            value = (m.get("test") or {}).get(key)
            if value is None or _nan(value):
                continue
            entry = {"type": hf_type, "value": round(float(value), 4), "name": f"test {key}", "verified": False}
            b = self.interval(key)
            if b and not _nan(b.get("low")):
                entry["args"] = {"ci95_low": round(b["low"], 4), "ci95_high": round(b["high"], 4), "interval": what}
            if key in ("macro_f1", "weighted_f1"):
                entry.setdefault("args", {})["average"] = key.split("_")[0]
            results.append(entry)
        mods = info.get("modalities") or []
        task_type = {"image": "image-classification", "text": "text-classification"}.get(
            mods[0] if len(mods) == 1 else "", "multimodal-classification")
        data_id = self.dataset.get("manifest") or "local-data"
        op = (m.get("clinical") or {}).get("operating_point") or {}
        fm = {
            "license": self.person.get("license") or "unknown",
            "library_name": "embedkit",
            "tags": ["embedkit", "clinical-prediction", info.get("task") or "classification", *mods],
            "datasets": [data_id],
            "metrics": sorted({t for _, t in CARD_METRICS}),
            "model-index": [{"name": self.person.get("title") or self.name, "results": [{
                "task": {"type": task_type, "name": f"{', '.join(info.get('labels', []))} ({info.get('task')})"},
                "dataset": {"type": data_id, "name": data_id, "split": "test"},
                "metrics": results}]}],
            "embedkit": {
                "labels": info.get("labels"), "classes": [named(c, self.names) for c in info.get("classes", [])],
                "decision_rule": op.get("rule"), "threshold": (m.get("calibration") or {}).get("threshold"),
                "operating_point": {c: {r: _round4(v.get(r)) for r in ("sensitivity", "specificity", "ppv", "npv")}
                                    | {f"{r}_ci95": [_round4(v["intervals"][r]["low"]), _round4(v["intervals"][r]["high"])]
                                       for r in ("sensitivity", "specificity", "ppv", "npv") if "intervals" in v}
                                    for c, v in (op.get("classes") or {}).items()},
                "prevalence": (m.get("clinical") or {}).get("prevalence"),
                "n": (m.get("data") or {}).get("n"),
                "calibration": {k: (m.get("calibration") or {}).get(k) for k in ("temperature", "calibrated_on")},
                "banners": [b["message"] for b in self.banners()],
            },
        }
        return _clean(fm)


def _nan(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _round4(v):
    return None if _nan(v) else round(float(v), 4)


def _clean(v):
    """NaN -> None, numpy -> Python, so YAML and JSON readers get plain values."""
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        v = v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


# ---------------------------------------------------------------- renderers


def _md_cell(v) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def card_markdown(card: Card) -> str:
    """model_card.md: YAML front matter, then the blocks as markdown."""
    import yaml

    lines = ["---", yaml.safe_dump(card.front_matter(), sort_keys=False, allow_unicode=True).rstrip(), "---", ""]
    for block in card.blocks():
        kind = block[0]
        if kind == "h1":
            lines += [f"# {block[1]}", ""]
        elif kind == "h2":
            lines += [f"## {block[1]}", ""]
        elif kind == "h3":
            lines += [f"### {block[1]}", ""]
        elif kind == "p":
            lines += [block[1], ""]
        elif kind == "banner":
            lines += [f"> **{block[3]}:** {block[2]}", ""]
        elif kind == "list":
            lines += [f"- {item}" for item in block[1]] + [""]
        elif kind == "table":
            _, columns, rows, note = block
            lines += ["| " + " | ".join(_md_cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in rows]
            lines += ["", f"*{note}*" if note else "", ""] if note else [""]
    return "\n".join(lines).rstrip() + "\n"


def card_html(card: Card) -> str:
    """The same blocks as an HTML fragment (escaped; the report wraps it in its page)."""
    e = html.escape
    parts = []
    for block in card.blocks():
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            parts.append(f"<{kind}>{e(block[1])}</{kind}>")
        elif kind == "p":
            parts.append(f"<p>{e(block[1])}</p>")
        elif kind == "banner":
            parts.append(f'<p class="banner banner-{e(block[1])}"><strong>'
                         f"{e(block[3])}:</strong> {e(block[2])}</p>")
        elif kind == "list":
            parts.append("<ul>" + "".join(f"<li>{e(str(i))}</li>" for i in block[1]) + "</ul>")
        elif kind == "table":
            _, columns, rows, note = block
            head = "".join(f"<th>{e(str(c))}</th>" for c in columns)
            head = f"<tr>{head}</tr>" if any(columns) else ""
            body = "".join("<tr>" + "".join(f"<td>{e(str(v))}</td>" for v in row) + "</tr>" for row in rows)
            parts.append(f'<table class="card">{head}{body}</table>' + (f'<p class="note">{e(note)}</p>' if note else ""))
    return "".join(parts)


def parse_front_matter(text: str) -> dict:
    """The YAML between the first two '---' lines of a model card (what a Hub reader parses)."""
    import yaml

    if not text.startswith("---\n"):
        raise EmbedkitError("a model card starts with YAML front matter between '---' lines")
    return yaml.safe_load(text[4:].split("\n---\n", 1)[0])


def write_model_card(model_dir, emb_dir=None, card_path=None, name: str | None = None) -> Path:
    """MODEL/model_card.md from MODEL's metrics.json and embedkit_model.json, and MODEL/card.json (the person's
    fields and the data description the card was built from). `name`: the folder's final name when MODEL is
    a staging folder."""
    from embedkit.store import write_json_atomic

    model_dir = Path(model_dir)
    person = read_card_toml(card_path) if card_path else {}
    from embedkit import __version__

    write_json_atomic(model_dir / "card.json", {"person": person, "dataset": dataset_of(emb_dir),
                                                "embedkit_version": __version__})
    card = Card.from_folder(model_dir, name=name)
    path = model_dir / "model_card.md"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(card_markdown(card), encoding="utf-8")
    tmp.replace(path)
    return path
