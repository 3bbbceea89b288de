"""What a bench run measures and how much: the sections, the size presets, the run's options."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from embedkit.errors import EmbedkitError

# each name is a module of this package with a `run(ctx)` (embedkit/bench/<name>.py), run in this order
SECTIONS = ("images", "text", "raw", "scaling", "train", "quantize", "backends")


@dataclass(frozen=True)
class Preset:
    """How much work each section does. `full` fits 10 minutes on an idle 2-core laptop."""

    image_models: tuple[str, ...]  # architectures timed in `images` (the first one against the pipeline)
    images: int  # images per extraction run of the first architecture
    images_other: int  # images per run of the others
    pipeline_images: int
    texts: int
    raw_rows: int
    raw_emb_epochs: int  # epochs of the embedding head (raw runs one: it is slow)
    scaling: tuple[int, ...]  # rows; the largest / smallest is the N -> 16N memory check
    train_rows: int  # BRSET has 13,000
    train_epochs: int
    quant_rows: int
    quant_epochs: int
    quant_seeds: int
    repeats: int  # timed runs per configuration, best kept
    matmul_n: int = 2048
    raw_image_model: str = "efficientnet-lite0"  # embedkit's default image encoder (real weights, offline)
    text_batch: int = 32  # extract's default batch
    backend_image_models: tuple[str, ...] = ("efficientnet-lite0", "dinov2-small")  # `backends` section
    backend_images: int = 315  # VQA-RAD's image count, for the first model
    backend_images_other: int = 64  # for the others (DINOv2-S runs ~8 images/s in torch fp32)
    backend_texts: int = 600


PRESETS = {
    "full": Preset(("dinov2-small", "dinov2-base", "clip-vit-b32"), images=96, images_other=32, pipeline_images=32,
                   texts=384, raw_rows=256, raw_emb_epochs=5, scaling=(1000, 4000, 16000), train_rows=13000,
                   train_epochs=5, quant_rows=300, quant_epochs=30, quant_seeds=3, repeats=2),
    "quick": Preset(("dinov2-small",), images=32, images_other=0, pipeline_images=12, texts=192, raw_rows=64,
                    raw_emb_epochs=3, scaling=(250, 1000, 4000), train_rows=4000, train_epochs=2, quant_rows=90,
                    quant_epochs=15, quant_seeds=2, repeats=2, backend_image_models=("efficientnet-lite0",),
                    backend_images=64, backend_texts=192),
    # for tests: every code path, seconds of work
    "tiny": Preset(("dinov2-tiny",), images=8, images_other=0, pipeline_images=3, texts=24, raw_rows=12,
                   raw_emb_epochs=2, scaling=(16, 64), train_rows=200, train_epochs=1, quant_rows=30, quant_epochs=3,
                   quant_seeds=1, repeats=1, matmul_n=512, raw_image_model="dinov2-tiny", text_batch=6,
                   backend_image_models=("dinov2-tiny",), backend_images=6, backend_texts=12),
}


@dataclass
class BenchConfig:
    preset: str = "full"
    sections: tuple[str, ...] = SECTIONS
    images: Path | None = None  # a folder of real images for `images` (default: generated radiographs)
    threads: int | None = None  # torch threads here and in the workers; None: torch's default
    text_model: str = "minilm"  # real weights, offline
    batch_size: int = 32

    def sizes(self) -> Preset:
        if self.preset not in PRESETS:
            raise EmbedkitError(f"unknown bench preset '{self.preset}' (choose {', '.join(PRESETS)})")
        return PRESETS[self.preset]
