"""Pixel parity at real size: what each encoder sees under the release flavours (models.tiling with
resample "release", then models.release_pixels) against the release's own transform and encode_image
pixel code, written here from LLaMA2-Accessory's source (3777c43)."""

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from models.flavours import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, from_name
from models.release_pixels import release_inputs
from models.tiling import TileSpec, load_and_tile
from models.vision import MixtureOfVisualExperts


def _photo(w: int, h: int) -> bytes:
    """A smooth JPEG with detail (gradients + noise), so every resampling step shows."""
    yy, xx = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(0)
    rgb = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (w + h)], -1) + rng.integers(0, 40, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _release_transform(data: bytes, size: int) -> torch.Tensor:
    """SPHINX/sphinx.py:32-35: image.convert("RGB"), get_transform("padded_resize", image_size):
    PadToSquare(int(mean·255), paste at ((side - w) // 2, (side - h) // 2)), Resize(size, BICUBIC) of the
    PIL square, ToTensor, Normalize(CLIP) (accessory/data/transform.py:11-34, 57-65)."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    bg = tuple(int(x * 255) for x in CLIP_MEAN)
    if w > h:
        square = Image.new(img.mode, (w, w), bg)
        square.paste(img, (0, (w - h) // 2))
    elif h > w:
        square = Image.new(img.mode, (h, h), bg)
        square.paste(img, ((h - w) // 2, 0))
    else:
        square = img
    t = torch.from_numpy(np.array(square.resize((size, size), Image.BICUBIC))).permute(2, 0, 1).float().div(255)
    return ((t - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1))[None]


def _dino(x: torch.Tensor) -> torch.Tensor:
    clip_mean, clip_std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    dino_mean, dino_std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x * clip_std + clip_mean - dino_mean) / dino_std


def _parts(x: torch.Tensor, s: int) -> list[torch.Tensor]:
    return [x[..., :s, :s], x[..., :s, s:], x[..., s:, :s], x[..., s:, s:]]


def _five(global_view: torch.Tensor, parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([global_view] + parts, dim=1).flatten(0, 1)


def _release_encoder_inputs(llama_type: str, image: torch.Tensor) -> dict[str, torch.Tensor]:
    """The pixel code of each release's encode_image (image: [1, 3, C, C] from the transform)."""
    half = lambda x, s, **kw: F.interpolate(x.half(), size=(s, s), **kw).to(x)  # noqa: E731
    if llama_type == "llama_ens_light":  # :370-374
        x224 = half(image, 224, mode="bicubic")
        return {"dino": _dino(x224), "convnext": half(image, 512)}
    if llama_type in ("llama_ens5_light", "mixtral_sparse_ens5"):  # llama_ens5_light.py:370-385
        local_224 = _five(half(image, 224, mode="bicubic"), _parts(half(image, 448, mode="bicubic"), 224))
        local_512 = _five(half(image, 512, mode="bicubic"), _parts(image, 512))
        out = {"dino": _dino(local_224), "convnext": local_512}
        return out if llama_type == "llama_ens5_light" else {**out, "clip": local_224, "qformer": local_224}
    if llama_type in ("llama_ens", "llama_ens5"):  # llama_ens.py:393-424, llama_ens5.py:383-385
        if llama_type == "llama_ens5":
            image = torch.cat([half(image, 224, mode="bicubic")] + _parts(image, 224), dim=0)
        return {"qformer": image, "clip": image, "convnext": half(image, 256), "dino": _dino(image)}
    x224 = half(image, 224, mode="bicubic")  # mixtral_sparse_ens.py:669-694
    return {"qformer": x224, "clip": x224, "convnext": half(image, 512), "dino": _dino(x224)}


@pytest.mark.parametrize("name", ["sphinx-tiny", "sphinx-tiny-1k", "sphinx", "sphinx-1k", "sphinx-moe",
                                  "sphinx-moe-1k"])
def test_encoder_inputs_equal_the_release_at_real_size(name):
    f = from_name(name)
    assert f.resample == "release"
    data = _photo(1300, 700)
    tiled = load_and_tile(data, TileSpec.from_flavour(f))
    ours = release_inputs(torch.from_numpy(tiled.views), f)
    theirs = _release_encoder_inputs(f.release, _release_transform(data, f.grid * f.tile_size))
    assert set(ours) == set(theirs)
    for encoder, expected in theirs.items():
        assert ours[encoder].shape == expected.shape, encoder
        assert (ours[encoder] - expected).abs().max() <= 1e-6, encoder  # measured: 0 (the same ops, in order)


def test_the_project_resampling_is_close_not_equal():
    """Why the setting exists: the project's own path (scale, paste, box-reduced global view, per-view
    antialiased bicubic) differs from the release by whole grey levels at real size."""
    f = from_name("sphinx-tiny-1k")
    project = from_name("sphinx-tiny-1k", resample="project")
    data = _photo(1300, 700)
    theirs = _release_encoder_inputs(f.release, _release_transform(data, 1024))
    with torch.device("meta"):
        vision = MixtureOfVisualExperts(project, 64)
    vision = vision.to_empty(device="cpu")  # the pixel buffers only: no encoder runs here
    for name, buf in (("mean_u8", project.normalise_mean_u8), ("std_u8", [v * 255 for v in project.std]),
                      ("dino_mean_u8", [v * 255 for v in project.dino_mean]),
                      ("dino_std_u8", [v * 255 for v in project.dino_std])):
        getattr(vision, name).copy_(torch.tensor(buf).view(1, 3, 1, 1))
    views = torch.from_numpy(load_and_tile(data, TileSpec.from_flavour(project)).views)
    ours = vision.encoder_inputs(views)
    assert (ours["dino"] - theirs["dino"]).abs().max() > 0.05


def test_the_model_uses_them():
    f = from_name("debug-sphinx-moe-1k")
    assert f.resample == "release"  # the toys resample as their releases do
    vision = MixtureOfVisualExperts(f, 32).eval()
    views = torch.from_numpy(load_and_tile(_photo(130, 70), TileSpec.from_flavour(f)).views)
    got = vision.encoder_inputs(views)
    want = release_inputs(views, f)
    assert set(got) == {"convnext", "dino", "clip", "qformer"}
    assert all(torch.equal(got[k], want[k]) for k in want)
    with torch.no_grad():
        assert vision(views, torch.ones(1, 4, dtype=torch.bool)).shape == (5 * 23, 32)
        assert vision(None, None).shape == (0, 32)  # text only: a whole padding image is encoded, none kept


def test_preprocessing_stores_the_same_views():
    """Preprocess keeps the scaled image (models.stored_image): under the release's resampling that is the
    whole canvas, so the shards' views are the very views serving and eval cut (models.tiling)."""
    from models.stored_image import store, views

    spec = TileSpec.from_flavour(from_name("sphinx-moe-1k"))
    data = _photo(1300, 700)
    stored = store(data, spec, codec="png")
    assert stored.plan == [1024, 1024, 0, 0]
    assert np.array_equal(views(stored.data, stored.plan, stored.kept, spec), load_and_tile(data, spec).views)
