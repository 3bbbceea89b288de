"""Image decode -> one resize -> center crop -> normalise, shared by every image encoder.

Why our own path instead of transformers' image processors: on a 2-core laptop decoding and
resizing a large JPEG costs as much as the model. We let libjpeg decode at a reduced scale
(draft mode, exact DCT scaling) when the image is much larger than needed, resize once, and
normalise straight into a preallocated float32 batch.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from embedkit.dicom import DICOM_EXTS, DicomReadError, dicom_rgb, looks_like_dicom

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}

# Pillow raises these for files that are not images, truncated or corrupt.
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class ImageDecodeError(Exception):
    """A file that could not be turned into an image; the message is the reason recorded."""


@dataclass(frozen=True)
class ImagePreprocess:
    """How an encoder wants its pixels. Carried by the encoder spec and written to provenance."""

    resize: int = 256  # shorter side is resized to this, keeping the aspect ratio
    crop: int = 224  # then a centred square of this side is cut out
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resample: str = "bicubic"
    draft: bool = True  # let libjpeg decode large JPEGs at 1/2, 1/4 or 1/8 scale first

    def to_dict(self) -> dict:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> "ImagePreprocess":
        d = dict(d)
        d["mean"] = tuple(d["mean"])
        d["std"] = tuple(d["std"])
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def square_preprocess(size: int) -> ImagePreprocess:
    """Square resize+crop at `size`, pixels scaled to [-1, 1]: embedkit's shared encoder."""
    return ImagePreprocess(resize=size, crop=size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def decode_image(source: str | Path | bytes, pre: ImagePreprocess, dicom=None) -> np.ndarray:
    """Decode one image to a `crop x crop x 3` uint8 array, or raise ImageDecodeError.

    DICOM files (a .dcm-like name, `dicom` given, or the DICM marker in a file Pillow does not know) go through
    dicom.py: `dicom` is the item's DicomFrame (frame and window); without it, the middle frame, auto window."""
    if not isinstance(source, bytes) and (dicom is not None or Path(source).suffix.lower() in DICOM_EXTS):
        return _decode_dicom(source, pre, dicom)
    try:
        if isinstance(source, bytes):
            img = Image.open(io.BytesIO(source))
        else:
            img = Image.open(source)
        with img:
            if pre.draft and img.format == "JPEG":
                # Smallest DCT scale whose result still has both sides >= the resize target.
                img.draft("RGB", (pre.resize, pre.resize))
            img = img.convert("RGB")  # also forces the full decode, so truncation surfaces here
            return resize_and_crop(img, pre)
    except ImageDecodeError:
        raise
    except FileNotFoundError:
        raise ImageDecodeError("file not found") from None
    except UnidentifiedImageError:
        if not isinstance(source, bytes) and looks_like_dicom(Path(source)):  # a DICOM file named by its UID
            return _decode_dicom(source, pre, dicom)
        raise ImageDecodeError("not an image (format not recognised)") from None
    except _DECODE_ERRORS as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ImageDecodeError(f"not a readable image ({type(e).__name__}: {reason[:120]})") from None


def _decode_dicom(source, pre: ImagePreprocess, dicom) -> np.ndarray:
    try:
        rgb = dicom_rgb(source, dicom)
    except DicomReadError as e:
        raise ImageDecodeError(str(e)) from None
    if 0 in rgb.shape[:2]:
        raise ImageDecodeError("image has zero size")
    return resize_and_crop(Image.fromarray(rgb, "RGB"), pre)


def resize_and_crop(img: Image.Image, pre: ImagePreprocess) -> np.ndarray:
    """An RGB image -> shorter side resized to `pre.resize`, centre crop `pre.crop`, as uint8 H x W x 3."""
    w, h = img.size
    if w == 0 or h == 0:
        raise ImageDecodeError("image has zero size")
    scale = pre.resize / min(w, h)
    new_w, new_h = max(pre.crop, round(w * scale)), max(pre.crop, round(h * scale))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), _RESAMPLE[pre.resample])
    left, top = (new_w - pre.crop) // 2, (new_h - pre.crop) // 2
    img = img.crop((left, top, left + pre.crop, top + pre.crop))
    return np.asarray(img, dtype=np.uint8)


def normalize_batch(images: list[np.ndarray], pre: ImagePreprocess, out: np.ndarray | None = None) -> np.ndarray:
    """Stack uint8 HxWx3 crops into a normalised float32 NCHW batch (written into `out` if given)."""
    n = len(images)
    if out is None or out.shape[0] < n:
        out = np.empty((n, 3, pre.crop, pre.crop), dtype=np.float32)
    out = out[:n]
    scale = np.asarray([1.0 / (255.0 * s) for s in pre.std], dtype=np.float32)
    shift = np.asarray([m / s for m, s in zip(pre.mean, pre.std)], dtype=np.float32)
    for i, img in enumerate(images):
        chw = img.transpose(2, 0, 1)
        np.multiply(chw, scale[:, None, None], out=out[i], casting="unsafe")
        out[i] -= shift[:, None, None]
    return out


def preprocess_images(sources: list, pre: ImagePreprocess) -> np.ndarray:
    """Decode and normalise a list of paths or bytes; raises on the first bad image."""
    return normalize_batch([decode_image(s, pre) for s in sources], pre)
