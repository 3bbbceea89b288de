"""What `embedkit compare` runs: the grid, the statistics, the optional steps. Defaults in one place."""

from __future__ import annotations

from dataclasses import dataclass, field

METRICS = ("macro_f1", "auroc", "accuracy", "weighted_f1")  # what the leaderboard can rank by


@dataclass
class CompareConfig:
    label: str  # the label column (binary or multiclass)
    out: str = ""  # the compare folder (set by compare())
    image_models: list[str] | None = None  # None: every image encoder available offline here (or in the folders)
    text_models: list[str] | None = None  # None: likewise for text
    fusions: list[str] | None = None  # None: every fusion `train` offers, plus the logistic baseline
    align: list[str] = field(default_factory=lambda: ["none", "center"])  # for fusions that see both modalities
    seeds: int = 3  # runs 0..seeds-1 (a new grouped split per seed unless the data has a split)
    cv: int | None = None  # k-fold cross-validation instead of seeds
    seed: int = 0
    metric: str = "macro_f1"  # ranks the leaderboard; every paired comparison is on it
    bootstrap: int = 1000  # paired resamples of the test groups
    group_col: str | None = None  # None: the group stored by extract
    groups: bool = True
    data_split: bool = True
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    epochs: int = 30  # the fusion heads' settings, as `train`'s defaults
    batch_size: int = 64
    lr: float = 1e-3
    modality_dropout: float = 0.0  # heads of both modalities: share of training rows with one modality masked, so
    #                                the robustness curves show how each holds up when a modality is missing
    # label efficiency: the best few configurations on nested shares of the training groups
    curve: bool = True
    curve_fractions: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0)
    curve_top: int = 3
    curve_seeds: int = 3
    target: float | None = None  # the metric value to extrapolate to; None: the best configuration's + 0.05
    # raw data through the encoders (opt-in, slow): frozen backbones every epoch, and end-to-end fine-tuning
    raw: bool = False
    raw_epochs: int = 5
    raw_rows: int | None = None  # None: every training row; a number: that many, drawn at random (time)
    budget_minutes: float | None = None  # drop the most expensive configurations first to fit
    progress: bool = True
