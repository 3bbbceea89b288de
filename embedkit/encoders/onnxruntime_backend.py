"""ONNX Runtime: runs the exported ONNX graph on CPU, in fp32 or with per-channel int8 weights.

Only what differs from the other backends lives here: building the artefact from the exported
ONNX file, and a session that maps named numpy inputs to the embedding. Choice, cache and parity
are backends.py's.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from embedkit.errors import EmbedkitError

NAME = "onnxruntime"
PRECISIONS = ("fp32", "int8")
MODEL_FILE = "model.onnx"


def missing() -> str | None:
    """Why this backend cannot run here, or None."""
    import importlib.util

    # found, not imported: importing onnxruntime takes a second, and asking costs nothing here
    if importlib.util.find_spec("onnxruntime") is None:
        return "onnxruntime is not installed: pip install 'embedkit[onnx]'"
    return None


def version() -> str:
    from importlib.metadata import version as installed_version

    return installed_version("onnxruntime")


def precision_problem(precision: str) -> str | None:
    if precision == "bf16":
        return "ONNX Runtime has no bf16 kernels on CPU: use --backend openvino or --backend torch for bf16"
    return None if precision in PRECISIONS else f"onnxruntime runs {' or '.join(PRECISIONS)}, not {precision}"


def build(onnx_path: Path, folder: Path, precision: str) -> None:
    """Turn the exported fp32 ONNX file into this backend's artefact in `folder` (model.onnx)."""
    target = folder / MODEL_FILE
    if precision == "fp32":
        if onnx_path != target:
            os.replace(onnx_path, target)
        return
    # int8: weights quantised per output channel (one scale per row), activations per batch at run time.
    # Per tensor, one outlier row sets the scale of all rows; per channel keeps MiniLM near fp32.
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantiser logs shape-inference notes on the root logger, per tensor
    try:
        quantize_dynamic(str(onnx_path), str(target), per_channel=True, weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    if onnx_path != target:
        onnx_path.unlink()


class Session:
    """One ONNX Runtime session; `__call__(feeds)` returns the float32 embedding matrix."""

    def __init__(self, folder: Path, threads: int | None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # its warnings about unused initialisers say nothing to a user
        try:
            self.session = ort.InferenceSession(str(folder / MODEL_FILE), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types; one line for the user
            raise EmbedkitError(f"ONNX Runtime cannot load {folder / MODEL_FILE} ({type(e).__name__}): delete "
                                f"{folder} to rebuild it") from None
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(None, {n: feeds[n] for n in self.input_names})[0].astype(np.float32, copy=False)
