"""OpenVINO: runs the exported graph on CPU in fp32 or bf16 (where the CPU has bf16 instructions).

The ONNX file is converted once to OpenVINO's IR (model.xml + model.bin, weights kept in fp32:
`compress_to_fp16=False`, so fp32 really is fp32). Precision is a compile-time hint; OpenVINO
would silently run fp32 where a CPU lacks bf16, so bf16 is refused there instead of recorded falsely.
int8 would need NNCF post-training quantisation: not built (use onnxruntime for int8).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from embedkit.errors import EmbedkitError

NAME = "openvino"
PRECISIONS = ("fp32", "bf16")
MODEL_FILE = "model.xml"
_HINTS = {"fp32": "f32", "bf16": "bf16"}


def missing() -> str | None:
    import importlib.util

    # found, not imported: importing openvino takes a second, and asking costs nothing here
    if importlib.util.find_spec("openvino") is None:
        return "openvino is not installed: pip install 'embedkit[openvino]'"
    return None


def version() -> str:
    from importlib.metadata import version as installed_version

    return installed_version("openvino")


def cpu_has_bf16() -> bool:
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def precision_problem(precision: str) -> str | None:
    if precision == "int8":
        return "OpenVINO int8 needs NNCF calibration, which embedkit does not build: use --backend onnxruntime " \
               "--precision int8"
    if precision not in PRECISIONS:
        return f"openvino runs {' or '.join(PRECISIONS)}, not {precision}"
    if precision == "bf16" and not cpu_has_bf16():
        return "this CPU has no bf16 instructions (OpenVINO would run fp32 and call it bf16): use --precision fp32"
    return None


def build(onnx_path: Path, folder: Path, precision: str) -> None:
    import openvino as ov

    ov.save_model(ov.Core().read_model(str(onnx_path)), str(folder / MODEL_FILE), compress_to_fp16=False)
    onnx_path.unlink()


class Session:
    """One compiled OpenVINO model; `__call__(feeds)` returns the float32 embedding matrix."""

    def __init__(self, folder: Path, threads: int | None, precision: str):
        import openvino as ov

        config = {"INFERENCE_PRECISION_HINT": _HINTS[precision], "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        try:
            self.compiled = ov.Core().compile_model(str(folder / MODEL_FILE), "CPU", config)
        except Exception as e:  # noqa: BLE001 - OpenVINO raises RuntimeError with pages of text
            raise EmbedkitError(f"OpenVINO cannot load {folder / MODEL_FILE} ({type(e).__name__}): delete "
                                f"{folder} to rebuild it") from None
        # an input port has several names (ONNX name plus aliases OpenVINO gives it); take the exported one
        known = ("pixel_values", "input_ids", "attention_mask", "token_type_ids")
        self.input_names = [next((n for n in known if n in port.get_names()), port.get_any_name())
                            for port in self.compiled.inputs]
        self.request = self.compiled.create_infer_request()

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        out = self.request.infer({n: feeds[n] for n in self.input_names})
        return np.array(out[self.compiled.outputs[0]], dtype=np.float32)
