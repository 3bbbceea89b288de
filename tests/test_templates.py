"""Metadata sentences: rendering, missing values, malformed templates, and label leakage."""

import random

import pytest

from embedkit.errors import EmbedkitError
from embedkit.templates import (
    LeakageFinding,
    check_template_fields,
    find_leakage,
    format_leakage,
    parse_template,
)

HAM = "Patient diagnosed via {dx_type}.[ Age: {age} years.] Sex: {sex}. Localization: {localization}."


def test_fields_are_listed_once_in_order():
    t = parse_template("{b} and {a:.1f}[, {b|x}] {c}")
    assert t.fields == ["b", "a", "c"]


def test_render_fields_formats_and_whole_floats():
    t = parse_template(HAM)
    row = {"dx_type": "histo", "age": 45.0, "sex": "male", "localization": "back"}
    assert t.render(row) == "Patient diagnosed via histo. Age: 45 years. Sex: male. Localization: back."
    assert parse_template("{x}").render({"x": 45.5}) == "45.5"
    assert parse_template("{x}").render({"x": "80.0"}) == "80"  # csv cells are strings
    assert parse_template("{x}").render({"x": 7}) == "7"
    assert parse_template("{x:.0f}").render({"x": 45.6}) == "46"
    assert parse_template("{x:.0f}").render({"x": "45.6"}) == "46"  # numeric spec on a csv string
    assert parse_template("{x:.1f}").render({"x": 45.0}) == "45.0"  # a spec wins over whole-number trimming
    assert parse_template("p{x:.2}").render({"x": "10000032"}) == "p10"


def test_fallback_and_optional_segments():
    t = parse_template("Sex: {sex|not recorded}.[ Aged {age} years.]")
    assert t.render({"sex": "female", "age": 61}) == "Sex: female. Aged 61 years."
    assert t.render({"sex": None, "age": None}) == "Sex: not recorded."
    # a segment is dropped when any of its fields is missing, but a fallback keeps it
    t2 = parse_template("A[, {a} and {b}][ ({c|no c})]")
    assert t2.render({"a": 1, "b": None}) == "A (no c)"
    assert t2.render({"a": 1, "b": 2, "c": 3}) == "A, 1 and 2 (3)"
    assert parse_template("{a|}x").render({}) == "x"


def test_literal_braces_and_brackets():
    assert parse_template("{{x}} [[y]] {x}").render({"x": 1}) == "{x} [y] 1"


@pytest.mark.parametrize("missing", [None, float("nan"), "", "   ", "nan", "NaN", "NAN", "None", "none", "NA", "na",
                                     "N/A", "n/a", "null", "NULL", " nan "])
def test_every_missing_spelling(missing):
    t = parse_template(HAM)
    row = {"dx_type": "histo", "age": missing, "sex": missing, "localization": "face"}
    out = t.render(row)
    assert out == "Patient diagnosed via histo. Sex: unknown. Localization: face."
    assert "nan" not in out.lower() and "none" not in out.lower() and "null" not in out.lower()


def test_numpy_nan_is_missing():
    np = pytest.importorskip("numpy")
    assert parse_template("[{a} years]").render({"a": np.float32("nan")}) == ""
    assert parse_template("{a}").render({"a": np.float64(3.0)}) == "3"


@pytest.mark.parametrize("template, problem, char", [
    ("Age {age", "unclosed '{'", 5),
    ("Age {age:.0f years", "unclosed '{'", 5),
    ("a } b", "single '}'", 3),
    ("x ] y", "']' without a matching '['", 3),
    ("ok [, aged {age}", "unclosed '['", 4),
    ("{}", "empty field name", 1),
    ("  { }", "empty field name", 3),
    ("[a [b {x}] c]", "nested '['", 4),
    ("[no fields here]", "without any {field}", 1),
    ("{a} {x:zz}", "invalid format spec 'zz'", 5),
    ("{a{b}", "unclosed '{'", 1),
])
def test_malformed_template_names_problem_and_position(template, problem, char):
    with pytest.raises(EmbedkitError) as e:
        parse_template(template)
    assert problem in str(e.value)
    assert f"at character {char}" in str(e.value)


def test_format_spec_that_does_not_fit_the_value_names_field_not_value():
    with pytest.raises(EmbedkitError) as e:
        parse_template("{age:d}").render({"age": "SECRET-TEXT"})
    assert "age" in str(e.value) and "SECRET" not in str(e.value)


def test_check_template_fields():
    check_template_fields(HAM, ["dx_type", "age", "sex", "localization", "x"], "where")
    with pytest.raises(EmbedkitError) as e:
        check_template_fields(HAM, ["dx_type", "age"], "ham10000.toml text.template")
    msg = str(e.value)
    assert "ham10000.toml text.template" in msg and "'sex'" in msg and "'localization'" in msg
    assert "'age'" not in msg.split("columns:")[0]


# --- leakage ------------------------------------------------------------------------------------------------

def _rows(n=300, seed=0):
    rnd = random.Random(seed)
    rows = []
    for i in range(n):
        y = rnd.choice(["mel", "nv", "bcc"])
        rows.append({
            "dx": y,
            "code": {"mel": "SECRET-A", "nv": "SECRET-B", "bcc": "SECRET-C"}[y],  # a 1-1 recoding of the label
            "noise": rnd.choice("abcdefghij"),
            "age": rnd.uniform(20, 90),
            "malignant": int(y != "nv"),
            "leaky_age": (70 if y != "nv" else 30) + rnd.uniform(0, 5),  # numeric, > 50 values: binned in deciles
            "row_id": f"id{i}",  # unique per row: memorising it must not count
        })
    return rows


def test_template_naming_the_label_column_is_found():
    found = find_leakage("Diagnosis {dx}, age {age}", _rows(), ["dx"])
    assert LeakageFinding("dx", "dx", "names a label column", 1.0) in found


def test_recoded_label_and_binned_numeric_predict_the_label_but_noise_does_not():
    found = find_leakage("{code} {noise} {age} {leaky_age} {row_id}", _rows(), ["dx", "malignant"])
    kinds = {(f.field, f.label, f.kind) for f in found}
    assert kinds == {("code", "dx", "predicts the label"), ("code", "malignant", "predicts the label"),
                     ("leaky_age", "malignant", "predicts the label")}
    assert all(f.score >= 0.95 for f in found)


def test_leakage_is_measured_on_training_rows_only():
    rows = _rows(300, seed=1)
    rnd = random.Random(2)
    for i, r in enumerate(rows):  # leaky on the last 100 rows (test), random on the 200 training rows
        r["late"] = r["code"] if i >= 200 else rnd.choice(["SECRET-A", "SECRET-B", "SECRET-C"])
    assert find_leakage("{late}", rows, ["dx"], train_idx=range(200)) == []
    assert [f.field for f in find_leakage("{late}", rows, ["dx"], train_idx=range(200, 300))] == ["late"]


def test_rows_without_a_label_are_ignored_and_threshold_applies():
    rows = _rows()
    for r in rows[:50]:
        r["dx"] = "nan"
    assert [f.field for f in find_leakage("{code}", rows, ["dx"])] == ["code"]
    for r in rows[50:100]:  # spoil the recoding on a sixth of the rows: below 0.95, above 0.7
        r["code"] = "SECRET-A"
    assert find_leakage("{code}", rows, ["dx"]) == []
    assert [f.field for f in find_leakage("{code}", rows, ["dx"], threshold=0.7)] == ["code"]


def test_format_leakage_names_field_and_label_but_no_row_contents():
    found = find_leakage("{dx} {code}", _rows(), ["dx"])
    text = format_leakage(found)
    lines = text.splitlines()
    assert len(lines) == 2
    assert "'dx'" in lines[0] and "names the label column" in lines[0]
    assert "'code'" in lines[1] and "predicts the label 'dx'" in lines[1]
    assert "SECRET" not in text and "mel" not in text


def test_a_field_unique_per_row_cannot_score_by_memorising_itself():
    rows = _rows(50, seed=3)
    for i, r in enumerate(rows):
        r["sample"] = f"s{i}"  # 50 distinct values, each seen once: few enough to count as categories
    assert find_leakage("{sample}", rows, ["dx", "malignant"]) == []
