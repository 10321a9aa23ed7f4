"""Image properties (properties.py): what each one measures, alone or in a batch."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from conftest import PHOTO_SIDE as SIDE
from conftest import photo
from vae_anomaly.images import properties


def test_properties_name_what_changed_in_an_image() -> None:
    rng = np.random.default_rng(0)
    x = np.stack([photo(rng).transpose(2, 0, 1) for _ in range(3)])
    dark = (x[:1].astype(np.float64) * 0.2).astype(np.uint8)
    blurred = np.asarray(Image.fromarray(x[0].transpose(1, 2, 0)).filter(ImageFilter.GaussianBlur(2)))
    grey = np.repeat(x[:1].mean(axis=1, keepdims=True).astype(np.uint8), 3, axis=1)
    flat = np.full((1, 3, SIDE, SIDE), 128, np.uint8)
    batch = np.concatenate([x[:1], dark, blurred.transpose(2, 0, 1)[None], grey, flat])
    p = properties.measure(batch, [(640, 480, True, "JPEG")] * 5)
    assert p["brightness"][1] < 0.3 * p["brightness"][0] and p["highlights"][1] < p["highlights"][0]
    assert p["sharpness"][2] < 0.5 * p["sharpness"][0], "blur removes the Laplacian's energy"
    assert p["saturation"][3] == 0 and p["colourfulness"][3] == pytest.approx(0, abs=1e-6)
    assert p["entropy"][4] == 0 and p["contrast"][4] == pytest.approx(0, abs=1e-3)
    assert p["width"][0] == 640 and p["aspect"][0] == pytest.approx(640 / 480)


def test_balance_says_where_the_bright_content_lies() -> None:
    x = np.zeros((4, 1, 28, 28), np.uint8)
    x[0, :, 10:18, 10:18] = 200  # centred
    x[1, :, :, :14] = 200  # left half only: a right half occluded
    x[2, :, 20:, :] = 100  # bottom rows only
    p = properties.measure(x, [(28, 28, False, "PNG")] * 4)
    assert p["balance-x"][0] == pytest.approx(0) and p["balance-y"][0] == pytest.approx(0)
    assert p["balance-x"][1] == pytest.approx(7 / 28 - 0.5) and p["balance-y"][1] == pytest.approx(0)
    assert p["balance-y"][2] == pytest.approx(24 / 28 - 0.5)
    assert p["balance-x"][3] == 0 and p["balance-y"][3] == 0, "a black frame has no bright content: the centre"


def test_properties_of_a_batch_are_those_of_each_image_alone() -> None:
    rng = np.random.default_rng(1)
    x = np.stack([photo(rng).transpose(2, 0, 1) for _ in range(5)])
    src = [(SIDE, SIDE, True, "PNG")] * 5
    together = properties.measure(x, src)
    for i in range(5):
        alone = properties.measure(x[i : i + 1], src[:1])
        for name, v in together.items():
            assert alone[name][0] == pytest.approx(v[i], rel=1e-6, abs=1e-6), name


def test_grey_models_measure_no_colour() -> None:
    p = properties.measure(np.zeros((2, 1, 8, 8), np.uint8), [(8, 8, False, "PNG")] * 2)
    assert "colourfulness" not in p and set(p) >= {"brightness", "sharpness", "entropy"}
