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
    sections: tuple[str, ...] = SECTIONS  # what runs when --sections is not given
    # seconds each section took in a reference run (the progress bar's weights: its time estimate scales them
    # by how fast this run goes; a section without one counts as the mean of the others)
    reference_seconds: tuple[tuple[str, float], ...] = ()


PRESETS = {
    "full": Preset(("dinov2-small", "dinov2-base", "clip-vit-b32"), images=96, images_other=32, pipeline_images=32,
                   texts=384, raw_rows=256, raw_emb_epochs=5, scaling=(1000, 4000, 16000), train_rows=13000,
                   train_epochs=5, quant_rows=300, quant_epochs=30, quant_seeds=3, repeats=2,
                   reference_seconds=(("images", 118.6), ("text", 39.7), ("raw", 32.1), ("scaling", 50.3),
                                      ("train", 27.9), ("quantize", 7.2))),  # benchmarks/results/full
    # quick: every comparison but `backends` (it exports and times 7 CPU variants per model: minutes on its own,
    # `--sections backends` runs it), at sizes that keep the whole run near 2 minutes on 2 idle cores
    "quick": Preset(("dinov2-small",), images=16, images_other=0, pipeline_images=8, texts=128, raw_rows=32,
                    raw_emb_epochs=3, scaling=(200, 3200), train_rows=2000, train_epochs=2, quant_rows=90,
                    quant_epochs=15, quant_seeds=2, repeats=2, backend_image_models=("efficientnet-lite0",),
                    backend_images=64, backend_texts=192, sections=tuple(s for s in SECTIONS if s != "backends"),
                    reference_seconds=(("images", 226.4), ("text", 115.0), ("raw", 48.5), ("scaling", 96.0),
                                       ("train", 39.4), ("quantize", 42.5))),  # 2 cores at load 6 (issue 28)
    # for tests: every code path, seconds of work
    "tiny": Preset(("dinov2-tiny",), images=8, images_other=0, pipeline_images=3, texts=24, raw_rows=12,
                   raw_emb_epochs=2, scaling=(16, 64), train_rows=200, train_epochs=1, quant_rows=30, quant_epochs=3,
                   quant_seeds=1, repeats=1, matmul_n=512, raw_image_model="dinov2-tiny", text_batch=6,
                   backend_image_models=("dinov2-tiny",), backend_images=6, backend_texts=12),
}


@dataclass
class BenchConfig:
    preset: str = "full"
    sections: tuple[str, ...] | None = None  # None: the preset's own (quick leaves out `backends`)
    images: Path | None = None  # a folder of real images for `images` (default: generated radiographs)
    threads: int | None = None  # torch threads here and in the workers; None: torch's default
    text_model: str = "minilm"  # real weights, offline
    batch_size: int = 32

    def sizes(self) -> Preset:
        if self.preset not in PRESETS:
            raise EmbedkitError(f"unknown bench preset '{self.preset}' (choose {', '.join(PRESETS)})")
        return PRESETS[self.preset]
