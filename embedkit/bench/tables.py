"""Results into words: the issue's targets, the tables of bench.md and the HTML report, and the README
blocks rendered from committed results (`embedkit bench --markdown`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from embedkit.bench import backends
from embedkit.errors import EmbedkitError


def targets(r: dict) -> list[dict]:
    """The issue's targets, each with the measured value and whether it was met."""
    s, rows = r["sections"], []

    def add(name, value, goal, met, note=""):
        rows.append({"target": name, "measured": value, "goal": goal, "met": met if value is not None else None,
                     "note": note})

    small = s.get("images", {}).get("models", {}).get("dinov2-small")
    if small:
        add("DINOv2-S extraction, end to end / fp32 matmul roofline", small["roofline_fraction"], ">= 0.85",
            small["roofline_fraction"] >= 0.85, f"model stage alone: {small['model_roofline_fraction']}")
        if "speedup_vs_pipeline" in small:
            add("DINOv2-S extraction / per-image pipeline", small["speedup_vs_pipeline"], ">= 1.5x",
                small["speedup_vs_pipeline"] >= 1.5, f"with --quantize int8: {small['int8_speedup_vs_pipeline']}x")
    if "text" in s:
        add("length-sorted / unsorted text batching, tokens/s", s["text"]["speedup"], ">= 2x",
            s["text"]["speedup"] >= 2)
    if "scaling" in s and s["scaling"]["n_ratio"] >= 16:
        v = s["scaling"]["extract_peak_ratio"]
        add(f"extraction peak memory, {s['scaling']['points'][-1]['n']} / {s['scaling']['points'][0]['n']} rows", v,
            "within 20 %", abs(v - 1) <= 0.2)
    if "train" in s:
        t = s["train"]
        f1_ok = t["embedkit"]["macro_f1"] >= t["reference"]["macro_f1"] - 0.005
        add("training epoch, reference loop / embedkit (batch 64, default threads)", t["speedup"],
            ">= 10x, macro-F1 >= reference", t["speedup"] >= 10 and f1_ok,
            f"macro-F1 {t['embedkit']['macro_f1']} vs {t['reference']['macro_f1']}")
        add("training epoch, reference loop / embedkit (batch 64, one thread each)", t["one_thread"]["speedup"],
            ">= 10x", t["one_thread"]["speedup"] >= 10,
            f"compute floor allows at most {t['max_possible_speedup_one_thread']}x")
        big = t["embedkit_big_batch"]
        f1_ok = big["macro_f1"] >= t["reference"]["macro_f1"] - 0.005
        add(f"training epoch, reference loop / embedkit (batch {big['batch_size']}, lr {big['lr']:g})",
            t["speedup_big_batch"], ">= 10x, macro-F1 >= reference", t["speedup_big_batch"] >= 10 and f1_ok,
            f"macro-F1 {big['macro_f1']} vs {t['reference']['macro_f1']}; compute floor allows at most "
            f"{t['max_possible_speedup']}x")
        pca = t["embedkit_pca"]
        f1_ok = pca["macro_f1"] >= t["reference"]["macro_f1"] - 0.005
        add(f"training epoch, reference loop / embedkit on PCA-{pca['dims'][0]}+{pca['dims'][1]} input (batch 64)",
            t["speedup_pca"], ">= 10x, macro-F1 >= reference", t["speedup_pca"] >= 10 and f1_ok,
            f"macro-F1 {pca['macro_f1']} vs {t['reference']['macro_f1']}; PCA fitted once in {pca['fit_seconds']} s, "
            f"keeps {pca['variance_kept']} of the variance; synthetic signal is low-rank, check on real data")
    if "backends" in s:
        backends.targets(s["backends"], add)
    return rows


# tables: bench.md and the HTML report render the same ones


def tables(r: dict) -> list[dict]:
    s, out = r["sections"], []

    def table(section, title, columns, rows, note=""):
        out.append({"section": section, "title": title, "columns": columns, "rows": rows, "note": note})

    if "images" in s:
        rows = []
        for arch, m in s["images"]["models"].items():
            e = m["embedkit"]
            rows.append([arch, m["gflops_per_image"], m["roofline_images_per_second"], e["items_per_second"],
                         e["model_items_per_second"], m["roofline_fraction"],
                         m.get("pipeline", {}).get("items_per_second", "-"), m.get("speedup_vs_pipeline", "-")])
            if "int8" in m:
                rows.append([f"{arch} --quantize int8", m["gflops_per_image"], m["roofline_images_per_second"],
                             m["int8"]["items_per_second"], m["int8"]["model_items_per_second"], "-", "-",
                             m["int8_speedup_vs_pipeline"]])
        table("images", "Image extraction throughput (images/s; random weights, real architectures)",
              ["model", "GFLOP/img", "roofline img/s", "embedkit end to end", "embedkit model stage",
               "fraction of roofline", "per-image pipeline", "speed-up vs pipeline"], rows,
              f"{s['images']['images']}; roofline = the best fp32 matmul rate (2048 x 2048, GFLOP/s) measured "
              f"during the model's runs, single products and back to back for as long as a run, / GFLOP per "
              f"image; end to end = hash + decode + preprocess + model + Parquet write "
              f"(model load not counted, nor for the pipeline). Pipeline: "
              + next((m["pipeline"]["how"] for m in s["images"]["models"].values() if "pipeline" in m), "-"))
        for arch, m in s["images"]["models"].items():
            table("images", f"{arch}: where the time goes (best run, seconds)", ["stage", "seconds"],
                  [[k, round(v, 3)] for k, v in m["embedkit"]["stage_seconds"].items()],
                  "decode runs in a thread beside the model, so stages overlap")
    if "text" in s:
        t = s["text"]
        table("text", f"Text batching, {t['model']}, {t['texts']} reports of skewed length "
                      f"(tokens: median {t['token_lengths']['median']}, p90 {t['token_lengths']['p90']}, "
                      f"max {t['token_lengths']['max']})",
              ["order", "tokens/s", "texts/s", "padding fraction", "seconds"],
              [[k, t[k]["tokens_per_second"], t[k]["texts_per_second"], t[k]["padding_fraction"], t[k]["seconds"]]
               for k in ("sorted", "unsorted")], f"speed-up {t['speedup']}x; batch {t['batch_size']}, "
                                                  f"max_length {t['max_length']}")
    if "raw" in s:
        t = s["raw"]
        table("raw", f"Raw data against stored embeddings ({t['rows']} rows; {t['encoders']['image']} + "
                     f"{t['encoders']['text']})",
              ["input", "seconds / epoch", "peak RSS MB", "peak above interpreter + imports MB"],
              [[k, t[k]["epoch_seconds"], t[k]["peak_rss_mb"], t[k]["above_baseline_mb"]]
               for k in ("raw", "embeddings")],
              f"{t['head']}. Epoch speed-up {t['epoch_speedup']}x; peak memory "
              f"{100 * t['peak_memory_reduction']:.1f} % "
              f"less ({100 * t['peak_memory_above_baseline_reduction']:.1f} % less above the interpreter baseline). "
              f"One-off extraction {t['extract_seconds']} s, {t['stored_bytes'] / 2**20:.2f} MB stored: it pays for "
              f"itself after {t['break_even_epochs']} raw epochs. Each configuration in its own process.")
    if "scaling" in s:
        t = s["scaling"]
        table("scaling", "Scaling with N (each point its own processes)",
              ["rows", "extract s", "extract s / 1k rows", "extract peak RSS MB", "train s / epoch",
               "train peak RSS MB"],
              [[pt["n"], pt["extract"]["seconds"], per, pt["extract"]["peak_rss_mb"], pt["train"]["epoch_seconds"],
                pt["train"]["peak_rss_mb"]] for pt, per in zip(t["points"], t["extract_seconds_per_1k_rows"])],
              f"{t['encoder']}. Extraction time per row at the largest N / smallest N: {t['extract_time_linearity']} "
              f"(1 = linear); peak memory ratio {t['extract_peak_ratio']} for {t['n_ratio']:g}x the rows.")
    if "train" in s:
        t = s["train"]
        rows = [["reference-style loop (Dataset per row, DataLoader)", t["reference"]["batch_size"],
                 t["reference"]["lr"], t["reference"]["epoch_seconds"], 1.0, t["reference"]["macro_f1"]],
                ["embedkit FusionClassifier", t["embedkit"]["batch_size"], t["embedkit"]["lr"],
                 t["embedkit"]["epoch_seconds"], t["speedup"], t["embedkit"]["macro_f1"]],
                ["embedkit FusionClassifier, large batch", t["embedkit_big_batch"]["batch_size"],
                 t["embedkit_big_batch"]["lr"], t["embedkit_big_batch"]["epoch_seconds"], t["speedup_big_batch"],
                 t["embedkit_big_batch"]["macro_f1"]],
                [f"embedkit FusionClassifier, PCA {t['embedkit_pca']['dims'][0]} + {t['embedkit_pca']['dims'][1]} "
                 f"dims (fitted once: {t['embedkit_pca']['fit_seconds']} s)", 64, 1e-3,
                 t["embedkit_pca"]["epoch_seconds"], t["speedup_pca"], t["embedkit_pca"]["macro_f1"]],
                ["reference-style loop, one thread", 64, 1e-3, t["one_thread"]["reference"]["epoch_seconds"], 1.0,
                 None],
                ["embedkit FusionClassifier, one thread", 64, 1e-3, t["one_thread"]["embedkit"]["epoch_seconds"],
                 t["one_thread"]["speedup"], None]]
        table("train", f"Training speed, BRSET-shaped synthetic set ({t['rows']} rows, {t['dims']['text']}-d text + "
                       f"{t['dims']['image']}-d image, 3 imbalanced classes)",
              ["loop", "batch", "lr", "s / epoch (best)", "speed-up", "test macro-F1"], rows,
              f"{t['epochs']} epochs each (2 on one thread) on the same {t['split']['train']} training rows, "
              f"macro-F1 on "
              f"{t['split']['test']} held-out rows. Compute floor of one epoch at {t['matmul_gflops']} GFLOP/s: "
              f"{t['epoch_floor_seconds']} s, so no loop can be more than {t['max_possible_speedup']}x faster than "
              f"the reference here.")
    if "quantize" in s:
        t = s["quantize"]
        table("quantize", f"int8 dynamic quantisation, {t['model']} ({t['texts']} reports; {t['task']})",
              ["weights", "texts/s end to end", "texts/s model stage", "model MB", "test macro-F1 (mean over seeds)"],
              [[k, t[k]["texts_per_second"], t[k]["model_texts_per_second"], round(t[k]["model_bytes"] / 2**20, 1),
                t[k]["macro_f1"]] for k in ("float32", "int8")],
              f"model-stage speed-up {t['speedup']}x; macro-F1 change {t['macro_f1_change']:+}; cosine between "
              f"float32 and int8 embeddings: mean {t['cosine_float32_int8']['mean']}, "
              f"min {t['cosine_float32_int8']['min']}")
    if "backends" in s:
        backends.tables(s["backends"], table)
    return out


# ---------------------------------------------------------------------------------------------
# README blocks: figures in the READMEs are rendered from the committed results, never typed in.
# A block is `<!-- bench:NAME -->` ... `<!-- /bench -->`; NAME says which results file and what of it.

BLOCK = re.compile(r"(?P<open><!-- bench:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(?P<close><!-- /bench -->)", re.S)


def markdown_table(columns: list, rows: list[list]) -> str:
    from embedkit.report import fmt

    lines = ["| " + " | ".join(map(str, columns)) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows])


def _machine(r: dict) -> str:
    m = r["machine"]
    return (f"{m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), fp32 matmul "
            f"{m['matmul_gflops']} GFLOP/s; load average {m['load_average_start']} at the start, "
            f"{m['load_average_end']} at the end; {r['total_seconds']} s in all.")


def _targets(r: dict) -> str:
    verdict = {True: "met", False: "missed", None: "-"}
    return markdown_table(["target", "measured", "goal", "met", "note"],
                          [[t["target"], t["measured"], t["goal"], verdict[t["met"]], t["note"]] for t in r["targets"]])


def _section(section: str, first_only: bool = False):
    """The tables bench.json holds for one section (as bench.md shows them), or only its first."""
    def render(r: dict) -> str:
        chosen = [t for t in r["tables"] if t["section"] == section][:1 if first_only else None]
        if not chosen:
            raise EmbedkitError(f"the results hold no '{section}' table")
        return "\n\n".join(f"**{t['title']}**\n\n{markdown_table(t['columns'], t['rows'])}"
                           + (f"\n\n{t['note']}" if t["note"] else "") for t in chosen)
    return render


def _backends_other(r: dict) -> str:
    rest = [t for t in r["tables"] if t["section"] == "backends"][1:]
    return "\n\n".join(f"**{t['title']}**\n\n{markdown_table(t['columns'], t['rows'])}" for t in rest)


def _gguf(r: dict) -> str:
    """benchmarks/llm_gguf.py's result: one row per format, ratios to transformers fp32."""
    n = r["formats"]["f16"]["n_parameters"]  # the GGUF count: with the output head transformers leaves out
    rows = [[("transformers fp32" if f["format"] == "fp32" else f"GGUF {f['file_type']}"), f["tokens_per_s"],
             f"{f['speed_vs_fp32']:.2f}x", f["tokens_per_cpu_s"], f"{f['cpu_speed_vs_fp32']:.2f}x",
             round(f["peak_rss_mb"]), round(f["model_bytes"] / 2**20), f"{f['bytes_per_parameter']:.3f}",
             f"{f['cosine_to_fp32']['mean']:g} / {f['cosine_to_fp32']['min']:g}"] for f in r["formats"].values()]
    return (f"{n / 1e9:.2f}B parameters ({r['model']['layers']} layers), {r['texts']} texts, {r['threads']} "
            f"thread{'s' if r['threads'] != 1 else ''}, best of {r['repeats']}; load average {r['load_average']}.\n\n"
            + markdown_table(["format", "tokens/s", "vs fp32", "tokens / CPU-s", "vs fp32", "peak RSS MB",
                              "weights MB", "bytes / param", "cosine to fp32 (mean / min)"], rows))


def _gguf_7b(r: dict) -> str:
    """A 7B model per format, from the measured bytes per parameter and overhead (llm_gguf.py: seven_b);
    bf16 was not run: its weights are f16's size, its overhead the fp32 run's."""
    s = r["seven_b"]
    names = {"fp32": "transformers fp32", "f16": "GGUF F16", "q8_0": "GGUF Q8_0 (`llama2-7b-q8`)",
             "q4_k_m": "GGUF Q4_K_M (`llama2-7b-q4`)"}
    rows = [[names.get(k, k), v["weights_gb"], v["estimated_peak_gb"]] for k, v in s.items()]
    if "f16" in s and "fp32" in s:
        bf16 = s["f16"]["weights_gb"]
        rows.insert(1, ["transformers bf16 (not run: f16's weights + the fp32 run's overhead)", bf16,
                        round(bf16 + s["fp32"]["overhead_mb"] / 1024, 2)])
    return markdown_table(["format", "weights GiB", "estimated peak GiB"], rows)


def _example(r: dict) -> str:
    """An example script's table, written into its results file by the run that measured it."""
    return r["table"]


def pretrain_trials_table(trials: list[dict]) -> str:
    """examples/pretrain_defaults.py's trials (one JSON line each): held-out retrieval vs chance, collapse, time."""
    rows = [[t["name"], " ".join(t["overrides"]) or "-",
             f"{t['retrieval']['i2t_R@1']:.3f} / {t['retrieval']['i2t_R@5']:.3f}",
             f"{t['retrieval']['t2i_R@1']:.3f} / {t['retrieval']['t2i_R@5']:.3f}",
             f"{t['chance']['R@1']:.3f} / {t['chance']['R@5']:.3f}",
             f"{t['image_cosine']:.2f} / {t['text_cosine']:.2f}", _check_verdict(t),
             round(t["seconds"]), t["peak_rss_mb"]] for t in trials]
    return markdown_table(["trial", "settings (--set)", "i2t R@1 / R@5", "t2i R@1 / R@5", "chance R@1 / R@5",
                           "cosine img / txt", "collapse check", "s", "peak MB"], rows)


def _check_verdict(trial: dict) -> str:
    """The collapse check's verdict as its warning words it: a collapsed space, or one that matches nothing."""
    if not trial["collapsed"]:
        return "passed"
    return "collapsed" if max(trial["image_cosine"], trial["text_cosine"]) > 0.95 else "at chance"


def compare_board(r: dict) -> str:
    """An `embedkit compare` run's compare.json: its leaderboard, the answer in words, the label-efficiency
    verdicts and what the run took."""
    from embedkit.comparison.report import NAMES, summary_lines

    metric = r["summary"]["metric"]

    def iv(lo, hi, signed=False):
        f = "{:+.3f}" if signed else "{:.3f}"
        return f"[{f.format(lo)}, {f.format(hi)}]" if lo is not None else "[n/a]"

    rows = []
    for x in r["rows"]:
        if x["status"] != "ok":
            rows.append(["-", x["config"], "not run: " + x.get("reason", ""), "", "", "", "", ""])
            continue
        vs_best = "(best)" if x.get("verdict") == "best" else \
            f"{x['delta_vs_best']:+.3f} {iv(x['delta_low'], x['delta_high'], True)}"
        vs_log = "" if x.get("verdict_vs_logistic") in (None, "same") else x["verdict_vs_logistic"]
        rows.append([x["rank"], x["config"], f"{x[metric]:.3f} {iv(x[metric + '_low'], x[metric + '_high'])}",
                     vs_best, x.get("verdict", ""), x.get("vs_chance") or "", vs_log,
                     "" if x.get("train_s") is None else f"{x['train_s']:.2f}"])
    table = markdown_table(["#", "configuration", f"{NAMES.get(metric, metric)} [95%]", "vs best (paired)", "verdict",
                            "vs chance", "vs logistic", "train s / run"], rows)
    lines = "\n".join(f"- {line}" for line in summary_lines(r))
    d = r["data"]
    took = f"{r['seconds'] / 60:.1f} min" if r.get("seconds") else "?"
    load = (r.get("timing") or {}).get("load_average")
    if load:
        took += f" on {r['timing']['cores']} cores at load average {load['start'][0]} -> {load['end'][0]}"
    head = (f"{d['rows']} rows shared by every configuration, {len(d['seeds'])} runs, test rows per run "
            f"{', '.join(str(s['test']) for s in d['splits'])} ({', '.join(map(str, d['test_groups']))} test groups); "
            f"groups: {d['groups']}; the whole `compare` took {took}.")
    return f"{head}\n\n{table}\n\n{lines}\n"


# name -> (results file under the results folder, renderer); a .jsonl file is read as a list of its lines
BLOCKS = {
    "full-machine": ("full/bench.json", _machine),
    "full-targets": ("full/bench.json", _targets),
    **{f"full-{s}": ("full/bench.json", _section(s, first_only=s == "images"))
       for s in ("images", "text", "raw", "scaling", "train", "quantize")},
    "backends-machine": ("backends/bench.json", _machine),
    "backends-targets": ("backends/bench.json", _targets),
    "backends": ("backends/bench.json", _section("backends", first_only=True)),
    "backends-other": ("backends/bench.json", _backends_other),
    "llm-gguf": ("llm_gguf.json", _gguf),
    "llm-gguf-1thread": ("llm_gguf_1thread.json", _gguf),
    "llm-gguf-7b": ("llm_gguf.json", _gguf_7b),
    "shared-family": ("shared_family.json", _example),
    "momo-unpaired": ("momo_unpaired.json", _example),
    "oneencoder": ("oneencoder.json", _example),
    "pretrain-trials": ("pretrain_trials.jsonl", pretrain_trials_table),
    **{f"compare-{name}": (f"compare/{name}.json", compare_board)
       for name in ("synthetic_image_signal", "vqa_rad_answer_yes", "vqa_rad_answer_yes_fresh", "vqa_rad_organ")},
}


def render_block(name: str, results: Path) -> str:
    """One block's markdown (without its markers), from the results folder."""
    if name not in BLOCKS:
        raise EmbedkitError(f"unknown bench block '{name}' (known: {', '.join(BLOCKS)})")
    source, render = BLOCKS[name]
    path = Path(results) / source
    if not path.is_file():
        raise EmbedkitError(f"bench block '{name}' needs {path}, which does not exist")
    text = path.read_text()
    data = [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" else json.loads(text)
    return render(data).rstrip("\n") + "\n"


def render_blocks(text: str, results: Path) -> str:
    """`text` with every bench block's body rendered afresh from the results folder."""
    return BLOCK.sub(lambda m: m["open"] + render_block(m["name"], results) + m["close"], text)


def block_names(text: str) -> list[str]:
    return [m["name"] for m in BLOCK.finditer(text)]


def refresh_files(paths: list[Path], results: Path, write: bool) -> dict[Path, list[str]]:
    """Each file's bench blocks that differ from the results (rewritten in place when `write`)."""
    stale = {}
    for path in map(Path, paths):
        if not path.is_file():
            raise EmbedkitError(f"no file '{path}'")
        text = path.read_text()
        if not block_names(text):
            raise EmbedkitError(f"'{path}' has no bench blocks (<!-- bench:NAME --> ... <!-- /bench -->)")
        fresh = render_blocks(text, results)
        old = {m["name"]: m["body"] for m in BLOCK.finditer(text)}
        stale[path] = [m["name"] for m in BLOCK.finditer(fresh) if old.get(m["name"]) != m["body"]]
        if write and fresh != text:
            path.write_text(fresh)
    return stale
