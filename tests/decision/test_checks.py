"""Image properties, calibrated checks and their reasons, and duplicates: what a data team reads."""

from __future__ import annotations

import csv
import io
import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFilter

from conftest import cli_run as run
from vae_anomaly import Detector
from vae_anomaly.decision.checks import Reason, kept, statistic_p_values
from vae_anomaly.decision.gate import evaluate_gate, parse_gate
from vae_anomaly.images import properties
from vae_anomaly.images.duplicates import (
    NEAR_BITS,
    DuplicateFinder,
    Fingerprints,
    _nearest,
    calibrate_bound,
    fingerprints,
    hamming,
)
from vae_anomaly.images.properties import BY_NAME
from vae_anomaly.model import artifact

SIDE = 32


def photo(rng: np.random.Generator, side: int = SIDE) -> np.ndarray:
    """A small colour 'photo': a smooth colour gradient, coarse texture, a bright disk, sensor noise.

    The texture (an 8x8 random pattern, enlarged) makes two pictures differ in their low frequencies,
    as two photos do; gradients alone would share perceptual hashes."""
    yy, xx = np.mgrid[0:side, 0:side] / side
    base = rng.uniform(60, 160, 3)
    tilt = rng.uniform(-40, 40, (2, 3))
    img = base + yy[..., None] * tilt[0] + xx[..., None] * tilt[1]
    img += np.kron(rng.normal(0, 20, (8, 8, 1)), np.ones((side // 8, side // 8, 3)))
    cy, cx, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.1, 0.25)
    img += (np.hypot(yy - cy, xx - cx) < r)[..., None] * rng.uniform(30, 80, 3)
    img += rng.normal(0, 5, img.shape)
    return np.clip(img, 0, 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def photos_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(7)
    (root / "normal").mkdir()
    (root / "in").mkdir()
    for i in range(300):
        Image.fromarray(photo(rng)).save(root / "normal" / f"n{i:03d}.png")
    for i in range(12):
        Image.fromarray(photo(rng)).save(root / "in" / f"ok{i:02d}.png")
    dark = (photo(rng).astype(np.float64) * 0.15).round().astype(np.uint8)
    Image.fromarray(dark).save(root / "in" / "dark.png")
    Image.fromarray(photo(rng)).filter(ImageFilter.GaussianBlur(2.5)).save(root / "in" / "blurred.png")
    Image.fromarray(photo(rng)).resize((8, 8), Image.Resampling.BILINEAR).save(root / "in" / "tiny.png")
    shutil.copyfile(root / "normal" / "n005.png", root / "in" / "leak_exact.png")
    Image.open(root / "normal" / "n006.png").save(root / "in" / "leak_near.jpg", quality=90)
    shutil.copyfile(root / "in" / "ok03.png", root / "in" / "zz_copy.png")
    return root


@pytest.fixture(scope="module")
def photos_model(photos_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tmp_path_factory.mktemp("pm") / "m.vae"
    args = ["--epochs", "30", "--folds", "1", "--calibration-fraction", "0.5", "--seed", "0", "--device", "cpu"]
    code, _, err = run("fit", photos_dir / "normal", "-o", model, *args)
    assert code == 0, err
    return model


@pytest.fixture(scope="module")
def scored(photos_dir: Path, photos_model: Path) -> dict[str, dict]:
    code, out, err = run("score", photos_dir / "in", "-m", photos_model, "--format", "json", "--no-cache")
    assert code == 0, err
    return {Path(r["path"]).name: r for r in json.loads(out)["records"]}


# ------------------------------------------------------------------ properties


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


def test_one_sided_checks_see_only_their_side() -> None:
    cal = np.arange(100.0)
    dark_side = BY_NAME["highlights"].tail
    assert statistic_p_values(cal, np.array([-5.0]), dark_side)[0] < 1 / 101, "beyond every normal value"
    assert statistic_p_values(cal, np.array([500.0]), dark_side)[0] == 1.0, "bright highlights are not dark"
    assert statistic_p_values(cal, np.array([500.0]), BY_NAME["shadows"].tail)[0] < 1e-4, "far beyond"
    both = statistic_p_values(cal, np.array([500.0, -1.0, -30.0, 10.0]), "two-sided")
    assert both[0] < both[2] < both[1] < 2 / 101, "either side; further out, smaller"
    assert both[3] == pytest.approx(2 * 12 / 101), "two-sided: twice (the 11 normal values <= 10, and itself)"


def test_a_flagged_image_always_keeps_one_reason() -> None:
    found = [Reason("model", 1.0, 0.2, "a"), Reason("contrast", 3.0, 0.4, "b")]
    assert kept(found, 0.01) == found[:1], "none below the cut-off: the most atypical one"
    assert kept(found, 0.3) == found[:1] and kept(found, 0.5) == found
    assert kept(found, None) == found[:1], "a raw score threshold has no cut-off: the most atypical finding"


# ------------------------------------------------------------------ duplicates


def _fp(exact: list[int], near: list[int]) -> Fingerprints:
    return Fingerprints(np.array(exact, np.uint64), np.array(near, np.uint64))


def test_the_near_bound_is_lowered_where_training_images_look_alike() -> None:
    rng = np.random.default_rng(5)
    ids = np.arange(1000, dtype=np.uint64)
    distinct = rng.integers(0, 2**63, 1000, dtype=np.int64).astype(np.uint64)
    assert calibrate_bound(Fingerprints(ids, distinct)) == NEAR_BITS
    alike = distinct.copy()
    alike[:30] = alike[30:60] ^ np.uint64(0b1111)  # 6% of them 4 bits from another: look-alikes, not copies
    assert calibrate_bound(Fingerprints(ids, alike)) == 3
    same = np.zeros(1000, np.uint64)
    assert calibrate_bound(Fingerprints(ids, same)) == -1, "identical hashes of distinct images: exact only"
    assert calibrate_bound(Fingerprints(np.zeros(1000, np.uint64), same)) == NEAR_BITS, "exact copies do not count"


def test_hamming_counts_differing_bits() -> None:
    a = np.array([0b1011, 2**64 - 1], np.uint64)
    b = np.array([0, 0b1], np.uint64)
    assert hamming(a, b).tolist() == [[3, 2], [64, 63]]


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 600), st.integers(0, 9000), st.integers(1, 3))
def test_the_blocked_search_finds_the_nearest_hash_as_the_full_comparison_does(
    seed: int, m: int, n: int, parts: int
) -> None:
    rng = np.random.default_rng(seed)
    store = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64) << np.uint64(rng.integers(0, 2))
    queries = rng.integers(0, 2**63, m, dtype=np.int64).astype(np.uint64)
    if n:
        queries[: m // 2] = store[rng.integers(0, n, m // 2)] ^ np.uint64(rng.integers(0, 2**8))
    d, where = _nearest(queries, np.array_split(store, parts))
    if n == 0:
        assert (d == 65).all()
        return
    full = hamming(queries, store)
    assert np.array_equal(d, full.min(axis=1)) and np.array_equal(where, full.argmin(axis=1))


def test_duplicates_name_the_earliest_copy_and_prefer_a_training_image() -> None:
    train = _fp([11, 12], [0b0, 2**40])
    finder = DuplicateFinder(train, ["train/a.png", "train/b.png"], near_bits=3)
    far = 0xFFFF_FFFF_0000_0000  # 32 bits from train/a's hash, 24 from train/b's
    first = finder.find(_fp([11, 20, 21, 20], [0b0, far, far + 0b111, far]), ["x", "y", "z", "w"])
    assert first[0] is not None and (first[0].of, first[0].kind, first[0].training) == ("train/a.png", "exact", True)
    assert first[1] is None, "the first of a group is not a copy"
    assert first[2] is not None and (first[2].of, first[2].kind, first[2].distance) == ("y", "near", 3)
    assert first[3] is not None and (first[3].of, first[3].kind) == ("y", "exact")
    later = finder.find(_fp([20, 30], [far, 2**40 + 1]), ["v", "u"])
    assert later[0] is not None and later[0].of == "y", "copies are found across batches"
    assert later[1] is not None and (later[1].of, later[1].kind) == ("train/b.png", "near")


def test_distinct_hashes_are_not_duplicates() -> None:
    rng = np.random.default_rng(0)
    near = rng.integers(0, 2**63, 2000, dtype=np.int64).astype(np.uint64)
    finder = DuplicateFinder(Fingerprints(np.arange(1000, dtype=np.uint64), near[:1000]), [str(i) for i in range(1000)])
    found = finder.find(
        Fingerprints(np.arange(5000, 6000, dtype=np.uint64), near[1000:]), [f"n{i}" for i in range(1000)]
    )
    assert not any(found), "random 64-bit hashes lie about 32 bits apart"


def test_near_fingerprints_survive_re_encoding_but_not_a_different_picture() -> None:
    rng = np.random.default_rng(3)
    a, b = photo(rng), photo(rng)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=80)
    a2 = np.asarray(Image.open(buf).convert("RGB"))
    fp = fingerprints(np.stack([a, a2, b]).transpose(0, 3, 1, 2), [(SIDE, SIDE, True, "")] * 3)
    d = hamming(fp.near, fp.near)
    assert d[0, 1] <= 4 < d[0, 2]
    assert fp.exact[0] != fp.exact[1]


# ------------------------------------------------------------------ gate


def test_gate_counts_duplicates_and_leaks() -> None:
    rules = parse_gate(["max-duplicates=1,max-leaks=0"])
    checks = evaluate_gate(rules, 0, 10, counts={"duplicates": 1, "leaks": 1})
    assert [(c.name, c.value, c.passed) for c in checks] == [("max-duplicates", 1, True), ("max-leaks", 1, False)]
    with pytest.raises(Exception, match="whole number"):
        parse_gate(["max-leaks=0.5"])


# ------------------------------------------------------------------ end to end


def test_reasons_say_dark_blurred_and_tiny_in_words(scored: dict[str, dict]) -> None:
    def texts(name: str) -> str:
        r = scored[name]
        assert r["flagged"], (name, r)
        return " | ".join(reason["text"] for reason in r["reasons"])

    assert "darker" in texts("dark.png") and "% of normal images" in texts("dark.png")
    assert "blurrier than" in texts("blurred.png") and "sharpness" in texts("blurred.png")
    tiny = texts("tiny.png")
    assert "narrower than" in tiny and "width 8 px against 32 px-32 px" in tiny


def test_copies_of_training_and_of_batch_images_are_named(scored: dict[str, dict]) -> None:
    exact, near, copy = scored["leak_exact.png"], scored["leak_near.jpg"], scored["zz_copy.png"]
    assert exact["duplicate_of"].endswith("normal/n005.png")
    assert (exact["duplicate_kind"], exact["duplicate_in"]) == ("exact", "training")
    assert near["duplicate_of"].endswith("normal/n006.png") and near["duplicate_kind"] == "near"
    assert copy["duplicate_of"].endswith("in/ok03.png") and copy["duplicate_in"] == "batch"
    assert copy["duplicate_kind"] == "exact"
    assert scored["ok03.png"]["duplicate_of"] is None, "the first of two copies is the original"
    others = [r for n, r in scored.items() if n.startswith("ok") or n in ("dark.png", "blurred.png", "tiny.png")]
    assert all(r["duplicate_of"] is None for r in others)


def test_every_flagged_record_has_a_reason_in_every_output(
    photos_dir: Path, photos_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    junit, page = tmp_path / "j.xml", tmp_path / "r.html"
    args = ("--format", "csv", "--junit", junit, "--html", page)
    code, out, err = run("score", photos_dir / "in", "-m", photos_model, *args)
    rows = list(csv.DictReader(io.StringIO(out)))
    flagged = [r for r in rows if r["flagged"] == "true"]
    assert code == 0 and len(flagged) >= 3
    assert all(r["reasons"] for r in flagged) and not any(r["reasons"] for r in rows if r["flagged"] == "false")
    assert next(r for r in rows if r["path"].endswith("leak_exact.png"))["duplicate_in"] == "training"
    cases = {Path(c.get("name")).name: c for c in ET.parse(junit).getroot().iter("testcase")}
    for r in flagged:
        message = cases[Path(r["path"]).name].find("failure").get("message")
        assert message.startswith("anomaly: " + r["reasons"].split("; ")[0]), message
    annotations = [line for line in err.splitlines() if line.startswith("::warning")]
    assert any("darker" in line and "dark.png" in line for line in annotations)
    assert any("training image in the batch" in line for line in annotations)
    text = summary.read_text()
    assert "darker" in text and "copy of a training image" in text
    html = page.read_text(encoding="utf-8")
    assert '<ul class="why"><li>' in html and "darker" in html and "exact copy of a training image" in html


def test_the_leak_gate_fails_the_batch(photos_dir: Path, photos_model: Path) -> None:
    code, out, err = run("score", photos_dir / "in", "-m", photos_model, "--gate", "max-leaks=0")
    assert code == 1 and "gate max-leaks: 2 <= 0 FAIL" in out, out
    code, _, err = run("score", photos_dir / "in", "-m", photos_model, "--gate", "max-leaks=2,max-duplicates=1")
    assert code == 0, err


def test_no_checks_decides_on_the_model_alone(photos_dir: Path, photos_model: Path) -> None:
    _, out, _ = run("score", photos_dir / "in", "-m", photos_model, "--format", "json", "--no-checks")
    doc = json.loads(out)
    assert doc["summary"]["threshold"]["checks"] == 0 and "image checks" not in doc["summary"]["rule"]
    _, out, _ = run("score", photos_dir / "in", "-m", photos_model, "--format", "json")
    assert json.loads(out)["summary"]["threshold"]["checks"] == 15, (
        "a colour model from files: all fourteen properties and the local statistic"
    )


def test_the_python_api_explains_and_finds_copies(fitted: Detector) -> None:
    """Arrays: pixel checks only (no file header), copies of training images and within the batch."""
    from conftest import disks

    training = disks(1000, seed=10)  # the `fitted` detector's own training array
    dark = (disks(1, seed=70).astype(np.float64) * 0.1).astype(np.uint8)
    x = np.concatenate([disks(3, seed=71), training[5:6], dark, disks(3, seed=71)[:1]])
    result = fitted.score(x)
    decision = fitted.decide(result)
    assert "property:width" not in fitted.calibration_, "an array has no file to check"
    assert decision.flags[4], "the dark frame"
    why = fitted.explain(result, decision, [4])[0]
    assert any(r.check in ("brightness", "highlights") and "darker" in r.text for r in why)
    dups = fitted.duplicates(result)
    assert dups[3] is not None and dups[3].training and dups[3].of == "[5]" and dups[3].kind == "exact"
    assert dups[5] is not None and not dups[5].training and (dups[5].of, dups[5].kind) == ("[0]", "exact")


def test_a_model_file_from_before_the_checks_scores_as_it_did(
    photos_dir: Path, photos_model: Path, tmp_path: Path
) -> None:
    mf = artifact.load(photos_model)
    cal = {k: v for k, v in mf.calibration.items() if not k.startswith(("property:", "train:"))}
    old = tmp_path / "old.vae"
    artifact.save(old, {k: v for k, v in mf.metadata.items() if k != "checks"}, mf.state_dict, cal)
    code, out, err = run("score", photos_dir / "in", "-m", old, "--format", "json")
    doc = json.loads(out)
    assert code == 0, err
    assert doc["summary"]["threshold"]["checks"] == 0 and doc["summary"]["leaks"] == 0, "no checks, no leaks"
    assert doc["summary"]["duplicates"] == 1, "copies within the batch need only the batch"
    flagged = [r for r in doc["records"] if r["flagged"]]
    assert flagged and all([reason["check"] for reason in r["reasons"]] == ["model"] for r in flagged)


def test_training_fingerprints_that_do_not_fit_their_names_are_refused(photos_model: Path, tmp_path: Path) -> None:
    mf = artifact.load(photos_model)
    mf.metadata["checks"]["training_files"] = mf.metadata["checks"]["training_files"][:-1]
    bad = tmp_path / "bad.vae"
    artifact.save(bad, mf.metadata, mf.state_dict, mf.calibration)  # a valid checksum over edited contents
    code, _, err = run("info", bad)
    assert code == 2 and "do not fit together" in err and "training file names" in err
