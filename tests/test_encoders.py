"""Encoders: the pipeline's vectors equal a direct transformers forward pass on the same input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embedkit.encoders import create_encoder, resolve_spec
from embedkit.encoders.preprocess import ImagePreprocess, decode_image, normalize_batch
from embedkit.errors import EmbedkitError
from embedkit.extract import ExtractConfig, extract
from embedkit.store import load_embeddings, read_embedding_table

from conftest import make_image


def _direct_image_forward(family: str, folder, pixels: np.ndarray, pooling: str = "cls") -> np.ndarray:
    from transformers import AutoModel, CLIPModel

    with torch.no_grad():
        x = torch.from_numpy(pixels)
        if family == "clip":
            out = CLIPModel.from_pretrained(folder).eval().get_image_features(pixel_values=x)
            return (out if isinstance(out, torch.Tensor) else out.pooler_output).numpy()
        out = AutoModel.from_pretrained(folder).eval()(pixel_values=x)
        if pooling == "cls":
            return out.pooler_output.numpy()
        return out.last_hidden_state[:, 1:].mean(1).numpy()


@pytest.mark.parametrize("family,pooling", [("dinov2", "cls"), ("dinov2", "mean"), ("clip", None)])
def test_image_embeddings_equal_direct_forward(tiny_models, paired_folder, tmp_path, family, pooling):
    folder = tiny_models[family]
    out = tmp_path / "emb"
    extract(paired_folder, out, ExtractConfig(image_model=str(folder), text_model=None, image_pooling=pooling,
                                              batch_size=3, progress=False))
    table = read_embedding_table(next(out.glob("image__*")))
    spec = resolve_spec(str(folder), "image")
    assert spec.preprocess.crop == (28 if family == "dinov2" else 32)  # read from preprocessor_config.json
    paths = [paired_folder / p for p in table.columns["path"]]
    pixels = normalize_batch([decode_image(p, spec.preprocess) for p in paths], spec.preprocess)
    expected = _direct_image_forward(family, folder, pixels, pooling or "cls")
    np.testing.assert_allclose(table.embeddings, expected, atol=1e-5, rtol=0)
    assert table.embeddings.dtype == np.float32 and table.provenance["family"] == family


def _direct_text_forward(family: str, folder, text: str, pooling: str) -> np.ndarray:
    from transformers import AutoModel, AutoTokenizer, CLIPModel

    tok = AutoTokenizer.from_pretrained(folder)
    enc = tok([text], return_tensors="pt")
    with torch.no_grad():
        if family == "clip":
            enc = tok([text], return_tensors="pt", truncation=True, max_length=16)
            out = CLIPModel.from_pretrained(folder).eval().get_text_features(input_ids=enc["input_ids"],
                                                                            attention_mask=enc["attention_mask"])
            return (out if isinstance(out, torch.Tensor) else out.pooler_output)[0].numpy()
        hidden = AutoModel.from_pretrained(folder).eval()(**enc).last_hidden_state[0]
    return hidden[-1].numpy() if pooling == "last" else hidden.mean(0).numpy()


@pytest.mark.parametrize("family,pooling", [("llama", "mean"), ("llama", "last"), ("bert", "mean"), ("clip", None)])
def test_text_embeddings_equal_direct_forward_and_ignore_batching(tiny_models, family, pooling):
    folder = str(tiny_models[family])
    spec = resolve_spec(folder, "text", pooling=pooling)
    enc = create_encoder(spec, "text", device="cpu")
    # lengths differ a lot, so batches pad heavily
    texts = ["short note", "a much longer report about the left lower lobe with a small effusion and mild opacity " * 2,
             "normal chest", "nodule seen"]
    batched, _ = enc.embed(texts)
    singles = np.stack([enc.embed([t])[0][0] for t in texts])
    np.testing.assert_allclose(batched, singles, atol=1e-5, rtol=0)
    for t, v in zip(texts, batched):
        np.testing.assert_allclose(v, _direct_text_forward(family, folder, t, pooling or "mean"), atol=1e-5, rtol=0)


def test_clip_counts_truncated_texts(tiny_models):
    spec = resolve_spec(str(tiny_models["clip"]), "text")
    assert spec.max_length == 16  # the tiny CLIP's context, read from its config
    enc = create_encoder(spec, "text", device="cpu")
    _, n = enc.embed(["short", "word " * 40, "also short"])
    assert n == 1


def test_image_embeddings_do_not_depend_on_batch_size(tiny_models, paired_folder, tmp_path):
    tables = []
    for bs in (1, 5):
        out = tmp_path / f"bs{bs}"
        extract(paired_folder, out, ExtractConfig(image_model=str(tiny_models["dinov2"]), text_model=None,
                                                  batch_size=bs, progress=False))
        tables.append(load_embeddings(out))
    np.testing.assert_array_equal(tables[0].ids, tables[1].ids)
    np.testing.assert_allclose(tables[0].embeddings["image"], tables[1].embeddings["image"], atol=1e-5, rtol=0)


def test_offline_minilm_gives_real_sentence_embeddings():
    enc = create_encoder(resolve_spec("minilm", "text"), "text", device="cpu")
    v, _ = enc.embed(["The chest X-ray shows pneumonia in the right lung.",
                      "Radiograph reveals a right lung infection.",
                      "The invoice is due at the end of the month."])
    assert v.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)  # MiniLM's Normalize layer
    assert v[0] @ v[1] > v[0] @ v[2] + 0.3


def test_offline_efficientnet_lite0_gives_real_features(tmp_path):
    enc = create_encoder(resolve_spec("efficientnet-lite0", "image"), "image", device="cpu")
    pre = enc.preprocess
    # real ImageNet features: a flipped copy of an image stays closer to it than unrelated noise
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:240, 0:320]
    scene = np.stack([(xx % 64 < 32) * 200, (yy % 48 < 24) * 180, np.full_like(xx, 90)], -1).astype(np.uint8)
    from PIL import Image

    Image.fromarray(scene).save(tmp_path / "a.png")
    Image.fromarray(scene[:, ::-1].copy()).save(tmp_path / "b.png")
    Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(tmp_path / "c.png")
    pixels = normalize_batch([decode_image(tmp_path / f"{n}.png", pre) for n in "abc"], pre)
    v = enc.embed(pixels)
    assert v.shape == (3, 1280) and np.all(v >= -0.3)  # pooled swish activations
    cos = (v / np.linalg.norm(v, axis=1, keepdims=True)) @ (v / np.linalg.norm(v, axis=1, keepdims=True)).T
    assert cos[0, 1] > cos[0, 2]


def test_registry_resolution_and_errors(tmp_path):
    assert resolve_spec("dinov2-base", "image").dim == 768
    assert resolve_spec("dinov2-small", "image", pooling="mean").pooling == "mean"
    with pytest.raises(EmbedkitError, match="pooling 'last'"):
        resolve_spec("dinov2-small", "image", pooling="last")
    with pytest.raises(EmbedkitError, match="not image"):
        resolve_spec("minilm", "image")
    with pytest.raises(EmbedkitError, match="does not exist"):
        resolve_spec(str(tmp_path / "nope"), "image")
    with pytest.raises(EmbedkitError, match="not available on this machine"):
        resolve_spec("someorg/some-model-that-is-not-cached", "image")


def test_fp16_on_cpu_is_refused():
    with pytest.raises(EmbedkitError, match="float16 is not supported on CPU"):
        create_encoder(resolve_spec("minilm", "text"), "text", device="cpu", dtype="float16")


def test_decode_uses_draft_mode_for_large_jpegs(tmp_path):
    make_image(tmp_path / "big.jpg", 0, size=(2000, 1600))
    pre = ImagePreprocess(resize=256, crop=224)
    assert decode_image(tmp_path / "big.jpg", pre).shape == (224, 224, 3)
    from PIL import Image

    with Image.open(tmp_path / "big.jpg") as img:
        img.draft("RGB", (256, 256))
        assert min(img.size) >= 256 and img.size[0] < 2000  # libjpeg decoded at a reduced scale
