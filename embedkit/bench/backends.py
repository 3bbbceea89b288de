"""`backends`: every CPU backend side by side, as ratios to torch fp32.

For each installed image encoder (and the random-weight architectures of data.py) and for the
text encoder, in one run and alternating (best of `repeats`, so a burst of other work on a shared
machine hits every side alike):

  model stage   the same preprocessed batches (images) or the same length-sorted batches (texts)
                through each backend's `embed`; cosine to torch fp32 row by row on every input
  end to end    extract() from scratch with each backend (hash, decode, model, write; load not counted)

Text also runs sentence-transformers' own `encode` on the same texts, and its ONNX / OpenVINO
backends and fastembed where those packages are installed (they are not embedkit dependencies; a
missing one is reported as such, never guessed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from embedkit.bench.data import folder_rows, photo_rows, skewed_reports
from embedkit.bench.harness import Context, alternate, quiet

CONFIGS = (("torch", "fp32"), ("torch", "bf16"), ("onnxruntime", "fp32"), ("openvino", "fp32"),
           ("openvino", "bf16"), ("onnxruntime", "int8"), ("torch", "int8"))


def _label(backend: str, precision: str) -> str:
    return f"{backend} {precision}"


def _cosines(a: np.ndarray, b: np.ndarray) -> dict:
    from embedkit.encoders.backends import parity

    p = parity(a, b)
    return {"min": p["min_cosine"], "mean": p["mean_cosine"]}


def _encoders(spec, modality: str, threads: int | None, log) -> tuple[dict, dict]:
    """Every configuration this model runs on here, parity not enforced: the table shows it instead."""
    from embedkit.encoders.backends import candidates, open_encoders

    wanted = set(candidates(spec, modality))
    encoders, errors = open_encoders(spec, modality, [c for c in CONFIGS if c in wanted], threads=threads, log=log)
    return encoders, {_label(*k): v for k, v in errors.items()}


def _extract_runs(data: Path, rows: list[dict], work: Path, modality: str, model: str, configs, threads, batch_size,
                  repeats: int, decode_workers: dict | None = None) -> dict:
    """extract() from scratch per configuration, alternating; best end-to-end rate and its stage seconds."""
    from embedkit.extract import ExtractConfig, extract
    from embedkit.items import SourceOptions

    src = (SourceOptions(id_col="id", image_col="image") if modality == "image"
           else SourceOptions(id_col="id", text_col="text"))
    best: dict = {}
    runs = {}
    for key in configs:
        backend, precision, workers = key if len(key) == 3 else (*key, None)

        def run(backend=backend, precision=precision, workers=workers, key=key):
            cfg = ExtractConfig(image_model=model if modality == "image" else None,
                                text_model=model if modality == "text" else None, device="cpu", backend=backend,
                                precision=precision, parity_floor=-1.0, threads=threads, batch_size=batch_size,
                                overwrite=True, progress=False, decode_workers=workers)
            with quiet():
                r = extract(data, work / "emb_backends", cfg, source=src, rows=rows).modalities[modality]
            st = r.costs["stage_seconds"]
            e2e = r.costs["wall_seconds"] - st.get("load_model", 0.0)
            rate = r.rows_embedded / e2e
            if rate > best.get(key, {}).get("items_per_second", 0):
                best[key] = {"items_per_second": round(rate, 2), "seconds": round(e2e, 3),
                             "stage_seconds": {k: round(v, 3) for k, v in st.items()}}

        runs[key] = run
    alternate(runs, repeats)
    return best


def run(ctx: Context) -> dict:
    """ONNX Runtime and OpenVINO against torch, per encoder."""
    work, p, cfg, log = ctx.work, ctx.preset, ctx.config, ctx.log
    images = {"models": {}}
    for k, arch in enumerate(p.backend_image_models):
        n = p.backend_images if k == 0 else p.backend_images_other
        if cfg.images:
            data, rows = Path(cfg.images), folder_rows(Path(cfg.images), n)
            source = f"images from {cfg.images}"
        else:
            data, rows = work, photo_rows(work, n)
            source = "generated radiograph-like JPEGs (1024 x 1024 px)"
        part = bench_images(data, rows, source, {arch: ctx.models.path(arch)}, work, p.repeats, cfg.batch_size,
                            cfg.threads, log)
        images["images"] = part["images"]
        images["models"].update(part["models"])
    return {"repeats": p.repeats, "images": images,
            "text": bench_texts(skewed_reports(p.backend_texts), cfg.text_model, work, p.repeats, cfg.batch_size,
                                cfg.threads, log)}

def bench_images(data: Path, rows: list[dict], source: str, models: dict[str, str], work: Path, repeats: int,
                 batch_size: int = 32, threads: int | None = None, log=None) -> dict:
    """Model stage and end to end for each image model (name -> what extract takes as --image-model)."""
    from embedkit.encoders import resolve_spec
    from embedkit.encoders.preprocess import preprocess_images

    out = {"images": source, "models": {}}
    for name, model in models.items():
        spec = resolve_spec(model, "image")
        encoders, errors = _encoders(spec, "image", threads, log)
        pixels = preprocess_images([data / r["image"] for r in rows], spec.preprocess)
        batches = [pixels[i:i + batch_size] for i in range(0, len(pixels), batch_size)]
        vectors = {k: np.concatenate([enc.embed(b) for b in batches]) for k, enc in encoders.items()}  # + warm-up
        seconds = alternate({k: (lambda enc=enc: [enc.embed(b) for b in batches]) for k, enc in encoders.items()},
                             repeats)
        ref = vectors[("torch", "fp32")]
        model_stage = {_label(*k): {"items_per_second": round(len(pixels) / min(s), 2),
                                    "cosine": _cosines(ref, vectors[k])} for k, s in seconds.items()}
        del encoders
        configs = [k for k in CONFIGS if _label(*k) in model_stage]
        # decode threads beside the fastest fp32-parity backend: one thread against the default, in the same rounds
        fast = _fastest(model_stage, 0.9999, exclude_torch=True)
        if fast:
            configs.append((*fast.split(" "), 1))
        e2e = _extract_runs(data, rows, work, "image", model, configs, threads, batch_size, repeats)
        end_to_end = {(_label(*k[:2]) + (", 1 decode thread" if len(k) == 3 else "")): v for k, v in e2e.items()}
        out["models"][name] = _ratios({"model": model, "n": len(pixels), "model_stage": model_stage,
                                       "end_to_end": end_to_end, "errors": errors})
        if Path(model).is_relative_to(work):  # a random-weight model of this run: its exports go with it
            import shutil

            from embedkit.encoders.export_cache import entry_dir

            shutil.rmtree(entry_dir(spec, "image", "-", "-").parent, ignore_errors=True)
    return out


def bench_texts(texts: list[str], model: str, work: Path, repeats: int, batch_size: int = 32,
                threads: int | None = None, log=None) -> dict:
    from embedkit.encoders import resolve_spec

    spec = resolve_spec(model, "text")
    encoders, errors = _encoders(spec, "text", threads, log)
    ordered = sorted(texts, key=len, reverse=True)  # extract's order: length-sorted batches
    batches = [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]
    tokens = sum(min(n, encoders[("torch", "fp32")].max_length)
                 for n in encoders[("torch", "fp32")].count_tokens(ordered))
    vectors = {k: np.concatenate([enc.embed(b)[0] for b in batches]) for k, enc in encoders.items()}
    runs = {_label(*k): (lambda enc=enc: [enc.embed(b) for b in batches]) for k, enc in encoders.items()}
    others, other_vectors = _other_libraries(spec, ordered, batch_size, threads)
    runs.update({k: v[0] for k, v in others.items() if callable(v[0])})
    seconds = alternate(runs, repeats)
    labelled = {**{_label(*k): v for k, v in vectors.items()}, **other_vectors}
    ref = labelled["torch fp32"]
    model_stage = {k: {"items_per_second": round(len(texts) / min(s), 2), "tokens_per_second": round(tokens / min(s), 1),
                       "cosine": _cosines(ref, labelled[k]) if k in labelled else None} for k, s in seconds.items()}
    del encoders
    configs = [k for k in CONFIGS if _label(*k) in model_stage]
    rows = [{"id": str(i), "text": t} for i, t in enumerate(texts)]
    e2e = _extract_runs(work, rows, work, "text", model, configs, threads, batch_size, repeats)
    not_run = {k: v[1] for k, v in others.items() if not callable(v[0])}
    return _ratios({"model": model, "n": len(texts), "tokens": tokens, "model_stage": model_stage,
                    "end_to_end": {_label(*k): v for k, v in e2e.items()}, "errors": errors, "not_run": not_run})


def _other_libraries(spec, texts: list[str], batch_size: int, threads: int | None):
    """sentence-transformers (torch, ONNX, OpenVINO) and fastembed on the same texts, where installed.
    -> ({name: (runner or None, why not)}, {name: vectors})."""
    from embedkit.encoders.loading import source_path

    runners, vectors = {}, {}
    path = source_path(spec)
    for backend in ("torch", "onnx", "openvino"):
        name = f"sentence-transformers {backend}"
        try:
            from sentence_transformers import SentenceTransformer

            st = SentenceTransformer(path, device="cpu", backend=backend)
            vectors[name] = st.encode(texts, batch_size=batch_size, convert_to_numpy=True)
            runners[name] = (lambda st=st: st.encode(texts, batch_size=batch_size), "")
        except Exception as e:  # noqa: BLE001 - an optional library that may be missing or refuse offline
            runners[name] = (None, f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
    try:
        import fastembed  # noqa: F401

        runners["fastembed"] = (None, "installed, but it downloads its own ONNX files from the hub at first use; "
                                      "this machine is offline")
    except ImportError:
        runners["fastembed"] = (None, "not installed (pip install fastembed)")
    return runners, vectors


def _fastest(stage: dict, floor: float, exclude_torch: bool = False) -> str | None:
    ours = {_label(*c) for c in CONFIGS}  # embedkit's own backends, not the other libraries
    ok = {k: v for k, v in stage.items() if k in ours and v.get("cosine") and v["cosine"]["min"] >= floor
          and not (exclude_torch and k.startswith("torch"))}
    return max(ok, key=lambda k: ok[k]["items_per_second"]) if ok else None


def _ratios(r: dict) -> dict:
    """Every rate as a ratio to torch fp32 of the same stage, and the fastest at each parity level."""
    for stage in ("model_stage", "end_to_end"):
        base = r[stage].get("torch fp32", {}).get("items_per_second")
        for v in r[stage].values():
            v["ratio"] = round(v["items_per_second"] / base, 2) if base else None
    for floor in (0.9999, 0.999, 0.99):
        best = _fastest(r["model_stage"], floor)
        if best:
            e2e = r["end_to_end"].get(best, {})
            r[f"best_at_{floor}"] = {"config": best, "model_stage_ratio": r["model_stage"][best]["ratio"],
                                     "end_to_end_ratio": e2e.get("ratio"),
                                     "cosine_min": r["model_stage"][best]["cosine"]["min"]}
    return r


def targets(section: dict, add) -> None:
    """The issue's goals, as rows of bench.targets (add(name, value, goal, met, note))."""
    for name, m in section.get("images", {}).get("models", {}).items():
        floor, goal = (0.9999, 4.0) if name.startswith("efficientnet") else (0.999, 1.5)
        best = m.get(f"best_at_{floor}")
        if best:
            add(f"{name} extraction end to end, fastest backend at cosine >= {floor} / torch fp32",
                best["end_to_end_ratio"], f">= {goal}x", (best["end_to_end_ratio"] or 0) >= goal,
                f"{best['config']}; model stage {best['model_stage_ratio']}x, cosine min {best['cosine_min']}")
    t = section.get("text")
    if t:
        for floor, goal in ((0.999, 1.8), (0.99, 3.0)):
            best = t.get(f"best_at_{floor}")
            if best:
                add(f"{t['model']} text, fastest backend at cosine >= {floor} / torch fp32 (model stage)",
                    best["model_stage_ratio"], f">= {goal}x", best["model_stage_ratio"] >= goal,
                    f"{best['config']}; end to end {best['end_to_end_ratio']}x, cosine min {best['cosine_min']}")
        best = t.get("best_at_0.999")
        for other, row in t["model_stage"].items():
            if best and not other.startswith(("torch", "onnxruntime", "openvino")):
                mine = t["model_stage"][best["config"]]["items_per_second"]
                add(f"embedkit {best['config']} / {other}, texts per second", round(mine / row["items_per_second"], 2),
                    "> 1x", mine > row["items_per_second"], "same texts, same run")
        for other, why in t.get("not_run", {}).items():
            add(f"embedkit / {other}", None, "> 1x", None, f"not measured: {why}")


def tables(section: dict, table) -> None:
    """bench.md rows: one line per (encoder, stage), each backend as 'ratio, cosine min'."""
    columns = ["encoder, stage", "torch fp32"] + [_label(*c) for c in CONFIGS[1:]]

    def cell(v):
        if not v:
            return "-"
        cos = f", cos {v['cosine']['min']:.4f}" if v.get("cosine") else ""
        return f"{v['ratio']}x{cos}"

    rows = []
    models = dict(section.get("images", {}).get("models", {}))
    if section.get("text"):
        models[section["text"]["model"]] = section["text"]
    for name, m in models.items():
        for stage in ("model_stage", "end_to_end"):
            base = m[stage].get("torch fp32", {})
            unit = "img/s" if "tokens" not in m else "texts/s"
            rows.append([f"{name}, {stage.replace('_', ' ')} ({m['n']})", f"1x ({base.get('items_per_second')} {unit})"]
                        + [cell(m[stage].get(c)) for c in columns[2:]])
    table("backends", "CPU backends against embedkit's torch fp32 (ratios; cosine min to torch fp32 over every "
                      "input)", columns, rows,
          f"{section.get('images', {}).get('images', '')}; same weights, same inputs, alternating runs, best of "
          f"{section.get('repeats')}; end to end = extract() from scratch, model load not counted")
    for name, m in models.items():
        extra = [[f"{k} ({stage.replace('_', ' ')})", v["items_per_second"], v.get("ratio"),
                  v["cosine"]["min"] if v.get("cosine") else "-"]
                 for stage in ("model_stage", "end_to_end") for k, v in m[stage].items() if k not in columns]
        for k, why in {**m.get("errors", {}), **m.get("not_run", {})}.items():
            extra.append([k, "-", "-", why])
        if extra:
            table("backends", f"{name}: other runs", ["run", "items/s", "x torch fp32", "cosine min / why not"],
                  extra)
