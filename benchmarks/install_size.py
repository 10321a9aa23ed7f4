"""What installing vae-anomaly costs: size on disk and wall time, in fresh virtual environments.

Issue 17 asks whether a scoring-only install without torch is worth building (an ONNX export scored
with onnxruntime). This measures, each in a new venv:
- `full`: `pip install torch==2.13.0 <this checkout>` (what a user or a CI job installs today);
- `torch alone`: `pip install torch==2.13.0`, the part an ONNX path would drop;
- `scoring without torch`: every runtime dependency but torch, plus onnxruntime (and onnx, which
  `torch.onnx.export` needs on the exporting side only), what such an install would hold at least.
Size is the venv's bytes on disk (`du`-like, after pip's caches are off); time is the wall time of
the pip command with pip's cache disabled, so that it is a first install, as in a CI job without a
cache. Files come from this machine's package index, so times are lower than over the internet.

    python benchmarks/install_size.py [--out benchmarks/results/install_size]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, as settings.py reads it
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _bytes(folder: Path) -> int:
    total = 0
    for dirpath, _, names in os.walk(folder):
        for name in names:
            p = Path(dirpath) / name
            if not p.is_symlink():
                total += p.stat().st_blocks * 512
    return total


def _venv(where: Path, packages: list[str]) -> dict[str, float]:
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True)
    base = _bytes(where)
    pip = [str(where / "bin" / "python"), "-m", "pip", "install", "-q", "--no-cache-dir", *packages]
    t0 = time.perf_counter()
    subprocess.run(pip, check=True, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    seconds = time.perf_counter() - t0
    return {"mb": (_bytes(where) - base) / 2**20, "seconds": seconds}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=RESULTS / "install_size")
    args = ap.parse_args()
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    no_torch = [d for d in deps if not d.replace(" ", "").startswith("torch")]
    runs = {
        "full": ["torch==2.13.0", str(ROOT)],
        "torch alone": ["torch==2.13.0"],
        "scoring without torch (+ onnxruntime)": [*no_torch, "onnxruntime"],
    }
    doc: dict[str, object] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "installs": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, packages in runs.items():
            print(f"{name}: pip install {' '.join(packages)}", file=sys.stderr, flush=True)
            doc["installs"][name] = {"packages": packages, **_venv(Path(tmp) / name.split()[0], packages)}  # type: ignore[index]
    lines = [
        f"# Install size and time, {doc['date']}, {doc['machine']}",
        "",
        "    python benchmarks/install_size.py",
        "",
        "| install | size in the venv | pip wall time (no cache) |",
        "| --- | --- | --- |",
    ]
    for name, row in doc["installs"].items():  # type: ignore[attr-defined]
        lines.append(f"| {name} | {row['mb']:.0f} MB | {row['seconds']:.0f} s |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=2))
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
