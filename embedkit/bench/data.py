"""Inputs for the comparisons: random-weight models of real architectures (speed depends on the
architecture, not on the weight values), generated images and reports, a BRSET-shaped embedding set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from embedkit.errors import EmbedkitError

_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
# sizes of the published checkpoints (facebook/dinov2-*, openai/clip-vit-base-patch32)
ARCHS = {
    "dinov2-small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536),
    "dinov2-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "clip-vit-b32": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                         patch_size=32, image_size=224),
    # not a published model: small and fast, for the scaling runs and tests (56 px input, 64-d output)
    "dinov2-tiny": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256),
}


def build_random_model(arch: str, folder: Path) -> Path:
    """A random-weight `arch` saved like a hub download (config, safetensors, preprocessor_config.json),
    so it loads through the same from_pretrained path as real weights."""
    import torch
    from transformers import CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if arch not in ARCHS:
        raise EmbedkitError(f"unknown architecture '{arch}' (choose {', '.join(ARCHS)})")
    folder = Path(folder)
    torch.manual_seed(0)
    if arch.startswith("clip"):
        # the text tower keeps CLIPConfig's defaults, which are ViT-B/32's (512 wide, 12 layers)
        model = CLIPModel(CLIPConfig(vision_config=ARCHS[arch], projection_dim=512))
        (resize, crop), (mean, std), kind = (224, 224), _CLIP, "CLIPImageProcessor"
    else:
        tiny = arch == "dinov2-tiny"
        model = Dinov2Model(Dinov2Config(patch_size=14, image_size=56 if tiny else 518, **ARCHS[arch]))
        (resize, crop), (mean, std), kind = ((64, 56) if tiny else (256, 224)), _IMAGENET, "BitImageProcessor"
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": kind, "do_resize": True, "size": {"shortest_edge": resize}, "resample": 3,
        "do_center_crop": True, "crop_size": {"height": crop, "width": crop}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(mean), "image_std": list(std),
        "do_convert_rgb": True}))
    return folder


class RandomModels:
    """Random-weight model folders, built once per bench run on first use."""

    def __init__(self, root: Path):
        self.root, self.folders = root, {}

    def __getitem__(self, arch: str) -> Path:
        if arch not in self.folders:
            self.folders[arch] = build_random_model(arch, self.root / arch)
        return self.folders[arch]

    def path(self, name: str) -> str:
        """What extract takes as a model: a random-weight folder for an architecture of ARCHS, else the name."""
        return str(self[name]) if name in ARCHS else name


def clinic_rows(root: Path, n: int) -> list[dict]:
    """The demo's SYNTHETIC clinic (radiograph-like JPEGs, reports, 3 labels), generated once per size."""
    from embedkit.demo import make_synthetic_clinic

    if not (root / "labels.csv").is_file() or sum(1 for _ in open(root / "labels.csv")) - 1 < n:
        make_synthetic_clinic(root, n)
    import csv

    with open(root / "labels.csv") as f:
        return list(csv.DictReader(f))[:n]


def photo_rows(root: Path, n: int, size: int = 1024, seed: int = 0) -> list[dict]:
    """The demo's radiographs enlarged to `size` px with sensor-like noise: decode and resize then cost
    what they cost on real clinic JPEGs (a 224 px file would flatter any per-image loop)."""
    from PIL import Image

    clinic = clinic_rows(root / "clinic", n)
    rng = np.random.default_rng(seed)
    (root / "photos").mkdir(parents=True, exist_ok=True)
    rows = []
    for r in clinic:
        path = root / "photos" / Path(r["image"]).name
        if not path.exists():
            big = np.asarray(Image.open(root / "clinic" / r["image"]).convert("L").resize((size, size), Image.BICUBIC))
            noisy = np.clip(big + rng.normal(0, 6, big.shape), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).convert("RGB").save(path, quality=90)
        rows.append({"id": r["id"], "image": f"photos/{path.name}"})
    return rows


def folder_rows(folder: Path, n: int) -> list[dict]:
    """The first n images of a user's folder (sorted), as extract rows."""
    from embedkit.sources import IMAGE_EXTS

    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTS)[:n]
    if not files:
        raise EmbedkitError(f"no images under '{folder}'")
    return [{"id": str(i), "image": p.relative_to(folder).as_posix()} for i, p in enumerate(files)]


def small_images(root: Path, n: int, size: int = 64, seed: int = 0) -> Path:
    """n small JPEGs and rows.csv (id, image, label) for the scaling runs, written quickly."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    lines = ["id,image,label"]
    for i in range(n):
        path = root / f"img{i:06d}.jpg"
        if not path.exists():
            pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            pixels[:, :, 0] = np.clip(pixels[:, :, 0].astype(int) + 60 * labels[i], 0, 255)  # a faint class cue
            Image.fromarray(pixels).save(path, quality=90)
        lines.append(f"{i},{path.name},{'ab'[labels[i]]}")
    (root / "rows.csv").write_text("\n".join(lines) + "\n")
    return root


_REPORT_PHRASES = [
    "History: cough for two weeks.", "Fever and productive cough.", "Heart size within normal limits.",
    "No pneumothorax.", "Bones intact.", "Trachea central.", "Patchy consolidation in the right lower lobe.",
    "Small left pleural effusion with blunting of the costophrenic angle.", "Lines and tubes: none.",
    "Compared with the prior study of last month, the opacity has increased.",
    "The patient has a history of hypertension, type 2 diabetes and coronary heart disease with a stent.",
    "Oxygen saturation 91 percent on room air; started on supplemental oxygen via nasal cannula.",
]


def skewed_reports(n: int, seed: int = 0) -> list[str]:
    """Report texts with the skewed lengths of real clinical notes: most a few sentences, a few a page
    (lognormal sentence counts: median 4, about 1 in 10 over 15)."""
    rng = np.random.default_rng(seed)
    counts = np.clip(rng.lognormal(np.log(4), 0.9, n).round().astype(int), 1, 80)
    return [" ".join(rng.choice(_REPORT_PHRASES, size=k)) for k in counts]


def brset_like(n: int = 13000, d_text: int = 4096, d_image: int = 768, seed: int = 0):
    """Embeddings shaped like BRSET's LLaMA-2 (4096-d) + DINOv2 (768-d), with signal: three grades
    (imbalanced like BRSET's diabetic retinopathy: 80 / 13 / 7 %) move each modality along a few
    directions of its own; a shared offset makes them anisotropic, as real LLM embeddings are."""
    rng = np.random.default_rng(seed)
    y = rng.choice(3, size=n, p=[0.80, 0.13, 0.07])
    blocks = []
    for d, strength in ((d_text, 0.9), (d_image, 0.7)):
        k = 8
        directions = rng.normal(size=(k, d)).astype(np.float32) / np.sqrt(k)
        centres = rng.normal(size=(3, k)).astype(np.float32)
        z = strength * centres[y] + rng.normal(size=(n, k)).astype(np.float32)
        x = z @ directions + rng.normal(size=(n, d)).astype(np.float32)
        x += 3 * rng.normal(size=d).astype(np.float32)  # the shared offset
        blocks.append(x)
    return blocks[0], blocks[1], y

