"""The training-text leakage scan: flagged words against hand counts, silence on neutral text, no text out."""

from __future__ import annotations

import re

import numpy as np
import pytest

from embedkit.errors import EmbedkitError
from embedkit.leakage import TOKEN_PATTERN, format_leakage, scan_text_leakage

NEUTRAL = ["left", "right", "upper", "lower", "anterior", "posterior"]


def neutral(i: int) -> str:
    # The same cycle of words in every class: no word says anything about the label.
    return f"patient seen in clinic, {NEUTRAL[i % 6]} side, visit 2024"


def outcome_corpus():
    """30 class-0 notes, 45 class-1 notes (base rates 0.4 / 0.6), with words planted by hand:

    died      12 class-0 rows, 0 class-1 rows   -> flagged: precision 12/12, coverage 12/30
    deceased   6 class-0 rows                   -> flagged: precision 6/6, coverage 6/30
    sepsis     4 class-0 rows                   -> precision 1, coverage 4/30, but only 4 rows (< min_rows 5)
    cough      8 class-0 rows, 2 class-1 rows   -> precision 0.8: not flagged
    fracture   4 class-1 rows                   -> precision 1, but coverage 4/45 < 0.1
    """
    texts, y = [], []
    for i in range(30):
        words = [neutral(i)]
        words += ["died"] if i < 12 else []
        words += ["deceased"] if 12 <= i < 18 else []
        words += ["sepsis"] if 18 <= i < 22 else []
        words += ["cough"] if 22 <= i < 30 else []
        texts.append(" ".join(words))
        y.append(0)
    for i in range(45):
        texts.append(neutral(i) + (" cough" if i < 2 else "") + (" fracture" if 2 <= i < 6 else ""))
        y.append(1)
    return texts, np.array(y)


def test_outcome_word_is_flagged_with_hand_counted_numbers():
    texts, y = outcome_corpus()
    r = scan_text_leakage(texts, y, "binary", [0, 1])
    assert r["n_rows_scanned"] == 75
    assert [(x["token"], x["class"]) for x in r["rules"]] == [("died", 0), ("deceased", 0)]  # ranked by cov*prec
    died, deceased = r["rules"]
    assert died["precision"] == pytest.approx(12 / 12) and died["coverage"] == pytest.approx(12 / 30)
    assert died["rows"] == 12
    assert deceased["precision"] == pytest.approx(1.0) and deceased["coverage"] == pytest.approx(6 / 30)
    assert format_leakage(r, "")[0] == "leakage? token 'died' -> class 0 on 40% of its training rows (precision 1.00)"
    assert "label 'outcome'" in format_leakage(r, "outcome")[0]
    # top keeps the best rule only
    assert [x["token"] for x in scan_text_leakage(texts, y, "binary", [0, 1], top=1)["rules"]] == ["died"]


def test_rare_tokens_and_small_lift_are_not_flagged():
    texts, y = outcome_corpus()
    # 'sepsis' would pass precision, lift and coverage but sits in 4 rows only.
    flagged = [x["token"] for x in scan_text_leakage(texts, y, "binary", [0, 1], min_rows=4)["rules"]]
    assert "sepsis" in flagged
    assert "fracture" not in flagged  # 4 rows too, all class 1, but only 4 of its 45 rows
    # A word in every row of a 90 % class is precise (1.0) but barely above the base rate (0.9): no rule.
    texts = [f"note {'routine' if i < 90 else 'other'} text" for i in range(100)]
    y = np.array([1] * 90 + [0] * 10)
    r = scan_text_leakage(texts, y, "binary", [0, 1])
    assert ("routine", 1) not in [(x["token"], x["class"]) for x in r["rules"]]
    assert [(x["token"], x["class"]) for x in r["rules"]] == [("other", 0)]  # precision 1 vs base rate 0.1


def test_tokens_are_lowercase_words_with_letters_of_three_characters_or_more():
    texts = ["DIED 2024 mg x2"] * 6 + ["seen"] * 6
    r = scan_text_leakage(texts, [0] * 6 + [1] * 6, "binary", [0, 1], min_rows=1)
    assert {x["token"] for x in r["rules"]} == {"died", "seen"}  # not '2024' (no letter), 'mg' or 'x2' (short)


def test_neutral_corpus_gives_no_findings():
    texts = [neutral(i) for i in range(200)]
    y = np.array([(i // 6) % 3 for i in range(200)])  # every word cycles through every class
    r = scan_text_leakage(texts, y, "multiclass", [0, 1, 2], label_names=["diagnosis"])
    assert r == {"label_words": [], "rules": [], "n_rows_scanned": 200}
    assert format_leakage(r, "diagnosis") == []


def test_label_words_name_the_class_and_its_share():
    classes = ["melanoma", "nevus", "basal cell carcinoma"]
    texts, y = [], []
    for i in range(20):  # melanoma: 'melanoma' written in 15 of 20 notes; the label's name in 2 of them
        texts.append("excision, melanoma confirmed" if i < 15 else "excision")
        texts[-1] += " final diagnosis" if i < 2 else ""
        y.append("melanoma")
    for i in range(20):  # nevus: 'melanoma' once ("no melanoma"), 'nevus' never
        texts.append("benign, no melanoma" if i == 0 else "benign")
        y.append("nevus")
    for i in range(10):  # basal cell carcinoma: 'cell' in 4 notes
        texts.append("atypical cell pattern" if i < 4 else "pattern")
        y.append("basal cell carcinoma")
    r = scan_text_leakage(texts, np.array(y, dtype=object), "multiclass", classes, label_names=["diagnosis"])
    words = {(w["token"], w["class"]): w for w in r["label_words"]}
    # 'melanoma' in one benign note ("no melanoma") is rarer there than elsewhere: not a hint for nevus
    assert set(words) == {("melanoma", "melanoma"), ("cell", "basal cell carcinoma"), ("diagnosis", "melanoma")}
    assert words["melanoma", "melanoma"]["share"] == pytest.approx(15 / 20)
    assert words["melanoma", "melanoma"]["share_elsewhere"] == pytest.approx(1 / 30)
    assert words["melanoma", "melanoma"]["rows"] == 15 and words["melanoma", "melanoma"]["source"] == "class name"
    assert words["cell", "basal cell carcinoma"]["share"] == pytest.approx(4 / 10)
    assert words["diagnosis", "melanoma"]["source"] == "label name"
    assert words["diagnosis", "melanoma"]["share"] == pytest.approx(2 / 20)
    assert any("'melanoma' is in 75% of class melanoma" in line for line in format_leakage(r, "diagnosis"))
    # The rule side sees 'melanoma' too: 15 of its 16 rows are melanomas.
    rule = next(x for x in r["rules"] if x["token"] == "melanoma")
    assert rule["class"] == "melanoma" and rule["precision"] == pytest.approx(15 / 16)
    assert rule["coverage"] == pytest.approx(15 / 20)


def test_multilabel_indicator_matrix():
    # effusion positive in rows 0-39, edema in rows 20-59, of 100; 'fluid' in rows 0-29 only
    n = 100
    y = np.zeros((n, 2), dtype=int)
    y[:40, 0] = 1
    y[20:60, 1] = 1
    texts = [f"chest film {'fluid level' if i < 30 else 'clear'}" for i in range(n)]
    r = scan_text_leakage(texts, y, "multilabel", ["effusion", "edema"], label_names=["effusion", "edema"])
    rules = {(x["token"], x["class"]): x for x in r["rules"]}
    # fluid -> effusion: 30 of its 30 rows are positive, and it covers 30 of 40 effusions.
    assert rules["fluid", "effusion"]["precision"] == pytest.approx(1.0)
    assert rules["fluid", "effusion"]["coverage"] == pytest.approx(30 / 40)
    # fluid -> edema: 10 of 30 rows positive: not a rule. 'level' says the same as 'fluid'.
    assert set(rules) == {("fluid", "effusion"), ("level", "effusion")}
    assert r["label_words"] == []
    with pytest.raises(EmbedkitError):
        scan_text_leakage(texts, y[:, :1], "multilabel", ["effusion", "edema"])


def test_rows_without_text_are_left_out_of_every_count():
    texts, y = outcome_corpus()
    # 20 class-1 rows without text and one row without a label: the numbers do not move.
    r = scan_text_leakage(texts + [None] * 20 + ["died"], list(y) + [1] * 20 + [None], "binary", [0, 1])
    assert r["n_rows_scanned"] == 75
    died = r["rules"][0]
    assert (died["token"], died["precision"], died["coverage"], died["rows"]) == ("died", 1.0, pytest.approx(0.4), 12)
    assert scan_text_leakage([None, None], [0, 1], "binary", [0, 1]) == {"label_words": [], "rules": [],
                                                                         "n_rows_scanned": 0}
    assert scan_text_leakage(["12", "a b"], [0, 1], "binary", [0, 1])["rules"] == []  # no token at all


def test_only_tokens_leave_the_scan():
    secret = "Mrs Quixotically Brandywine was transferred from Zanzibarton ward at night"
    texts, y = outcome_corpus()
    texts = [t + " " + secret if label == 0 else t for t, label in zip(texts, y)]  # every secret word is a rule
    r = scan_text_leakage(texts, y, "binary", [0, 1], top=50)
    assert {"quixotically", "brandywine", "zanzibarton"} <= {x["token"] for x in r["rules"]}
    shown = repr(r) + "\n".join(format_leakage(r, "outcome"))
    assert secret not in shown and secret.lower() not in shown
    assert not re.search(r"quixotically\W+brandywine", shown)  # no two words of a note side by side

    def strings(obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                yield from strings(v)
        elif isinstance(obj, list):
            for v in obj:
                yield from strings(v)
        elif isinstance(obj, str):
            yield obj

    for s in strings(r):
        assert re.fullmatch(TOKEN_PATTERN, s), s  # a single token, nothing more


def test_fifty_thousand_rows_do_not_stall():
    rng = np.random.default_rng(0)
    vocab = np.array([f"word{i}" for i in range(2000)])
    texts = [" ".join(rng.choice(vocab, 30)) for _ in range(50_000)]
    y = rng.integers(0, 7, 50_000)
    r = scan_text_leakage(texts, y, "multiclass", list(range(7)))
    assert r["n_rows_scanned"] == 50_000 and r["rules"] == []


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(EmbedkitError, match="task"):
        scan_text_leakage(["a"], [0], "regression", [0, 1])
    with pytest.raises(EmbedkitError, match="labels"):
        scan_text_leakage(["a", "b"], [0], "binary", [0, 1])


# ---------------------------------------------------------------- label types (issue 26: numeric labels scanned 0 rows)


def test_numeric_labels_with_class_names_as_text_are_scanned():
    """extract stores 0/1 labels as numbers; train names the classes as text: the scan must still see every row."""
    texts, y = outcome_corpus()
    for labels, classes in ((y, ["0", "1"]), (y.astype(float), ["0", "1"]), (y, [0.0, 1.0]),
                            (np.array([str(v) for v in y], dtype=object), [0, 1])):
        r = scan_text_leakage(texts, labels, "binary", classes)
        assert r["n_rows_scanned"] == 75
        assert [x["token"] for x in r["rules"]] == ["died", "deceased"]


def test_string_labels_are_scanned():
    texts, y = outcome_corpus()
    names = np.array(["dead", "alive"], dtype=object)[y]
    r = scan_text_leakage(texts, names, "binary", ["alive", "dead"])
    assert r["n_rows_scanned"] == 75 and (r["rules"][0]["token"], r["rules"][0]["class"]) == ("died", "dead")


def test_training_scans_numeric_multilabel_and_string_labels(tmp_path):
    """End to end through train: 0/1 integer labels as extract stores them, a multilabel pair, string labels."""
    from embedkit.store import BASE_COLUMNS, PartWriter, build_schema
    from embedkit.train import TrainConfig, train

    rng = np.random.default_rng(0)
    n = 120
    y = np.arange(n) % 2
    other = (np.arange(n) // 12) % 2  # every neutral word in both of its classes
    texts = [f"{neutral(i // 2)}{' died' if y[i] == 1 and i % 3 else ''}" for i in range(n)]
    cols = {"outcome": y.tolist(), "other": other.tolist(), "word": ["yes" if v else "no" for v in y],
            "split": ["train"] * 80 + ["val"] * 20 + ["test"] * 20}
    ids = [f"r{i:03d}" for i in range(n)]
    for modality in ("image", "text"):
        x = rng.normal(size=(n, 8)).astype(np.float32)
        prov = {"name": "t", "source": "t", "family": "t", "revision": "1", "pooling": "mean", "dim": 8,
                "preprocess": None, "max_length": None, "normalize": False, "dtype": "float32",
                "label_columns": ["outcome", "other", "word"]}
        labels = {k: v for k, v in cols.items() if k != "split"}
        w = PartWriter(tmp_path / "emb" / f"{modality}__t", build_schema(8, labels, prov, text_column=modality == "text"))
        batch = {"id": ids, "path": ids, "sha256": [f"{modality}{i}" for i in ids], "group": [None] * n, **cols}
        if modality == "text":
            batch["text"] = texts
        w.write({**batch, **{k: [None] * n for k in BASE_COLUMNS if k not in batch and k != "embedding"}}, x)
        w.close()
    fast = dict(fusion="text", epochs=1, bootstrap=0, ood_guard="none")
    m = train(tmp_path / "emb", tmp_path / "m1", TrainConfig(labels=["outcome"], **fast))
    assert m["leakage"]["n_rows_scanned"] == 80  # every training row (it was 0 with integer labels)
    assert [(r["token"], r["class"]) for r in m["leakage"]["rules"]] == [("died", "1")]
    m = train(tmp_path / "emb", tmp_path / "m2", TrainConfig(labels=["word"], **fast))
    assert m["leakage"]["n_rows_scanned"] == 80 and m["leakage"]["rules"][0]["class"] == "yes"
    m = train(tmp_path / "emb", tmp_path / "m3", TrainConfig(labels=["outcome", "other"], **fast))
    assert m["leakage"]["n_rows_scanned"] == 80
    assert [(r["token"], r["class"]) for r in m["leakage"]["rules"]] == [("died", "outcome")]  # named, not "0"
