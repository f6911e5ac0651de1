"""Splits you can trust: grouped splits, folds, recorded splits reused, per-split synthetic caches."""

import json

import numpy as np
import pytest
from PIL import Image

from unetpp_tf.data import fold_indices, from_arrays, from_directory, split_indices, synthetic, synthetic_sample

SPLIT_NAMES = ("train", "val", "test")


def write_pair(root, stem, value):
    """An 8x8 gray image (constant `value`) and its binary mask, as root/images|masks/{stem}.png."""
    for folder in ("images", "masks"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    image = np.full((8, 8), value, np.uint8)
    Image.fromarray(image).save(root / "images" / f"{stem}.png")
    Image.fromarray(((image > 127) * 255).astype(np.uint8)).save(root / "masks" / f"{stem}.png")
    return str(root / "images" / f"{stem}.png"), str(root / "masks" / f"{stem}.png")


def group_sizes_case(seed):
    """Group keys for ~60 samples in 15 groups of sizes 1..8, in shuffled sample order."""
    rng = np.random.default_rng(100 + seed)
    keys = [f"g{k}" for k in range(15) for _ in range(int(rng.integers(1, 9)))]
    return [keys[i] for i in rng.permutation(len(keys))]


def assert_partition(parts, count):
    together = np.concatenate([parts[name] for name in SPLIT_NAMES])
    assert sorted(together.tolist()) == list(range(count))  # disjoint and covering


# ----------------------------------------------------------------------------- split_indices


def test_ungrouped_indices_are_unchanged():
    # Computed with the code before grouped splits existed: runs keep their splits.
    parts = split_indices(20, seed=0)
    assert parts["train"].tolist() == [0, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 16, 19]
    assert parts["val"].tolist() == [14, 17, 18]
    assert parts["test"].tolist() == [1, 9, 15]
    parts = split_indices(20, (0.6, 0.2, 0.2), seed=3)
    assert parts["val"].tolist() == [0, 9, 14, 17] and parts["test"].tolist() == [4, 5, 7, 19]


@pytest.mark.parametrize("seed", range(6))
def test_grouped_split_never_straddles_and_follows_fractions(seed):
    groups = group_sizes_case(seed)
    count = len(groups)
    parts = split_indices(count, (0.6, 0.2, 0.2), seed=seed, groups=groups)
    assert_partition(parts, count)
    where = {}
    for name in SPLIT_NAMES:
        for i in parts[name]:
            assert where.setdefault(groups[i], name) == name, f"group {groups[i]} straddles splits"
    largest = max(groups.count(key) for key in set(groups))
    for name in ("val", "test"):
        assert abs(len(parts[name]) - round(count * 0.2)) <= largest  # as close as whole groups allow
    again = split_indices(count, (0.6, 0.2, 0.2), seed=seed, groups=groups)
    assert all(np.array_equal(parts[name], again[name]) for name in SPLIT_NAMES)


def test_grouped_split_depends_on_seed_and_fills_to_target():
    groups = [k // 2 for k in range(40)]  # 20 groups of 2
    splits = [split_indices(40, (0.5, 0.25, 0.25), seed=s, groups=groups) for s in range(3)]
    assert [len(p["test"]) for p in splits] == [10, 10, 10]
    assert not np.array_equal(splits[0]["test"], splits[1]["test"])


def test_grouped_split_too_few_groups_raises():
    with pytest.raises(ValueError, match=r"30 samples in 3 groups .* part empty; use more, smaller groups"):
        split_indices(30, seed=0, groups=[k // 10 for k in range(30)])
    with pytest.raises(ValueError, match="one group key per sample"):
        split_indices(5, groups=["a", "b"])


# ----------------------------------------------------------------------------- folds


@pytest.mark.parametrize("seed", range(4))
def test_folds_are_disjoint_cover_and_respect_groups(seed):
    groups = group_sizes_case(seed)
    count = len(groups)
    folds = fold_indices(count, 4, seed=seed, groups=groups)
    assert len(folds) == 4
    vals = np.concatenate([fold["val"] for fold in folds])
    assert sorted(vals.tolist()) == list(range(count))
    for fold in folds:
        assert sorted(np.concatenate([fold["train"], fold["val"]]).tolist()) == list(range(count))
        assert not set(fold["train"].tolist()) & set(fold["val"].tolist())
        assert not {groups[i] for i in fold["train"]} & {groups[i] for i in fold["val"]}
    sizes = [len(fold["val"]) for fold in folds]
    assert max(sizes) - min(sizes) <= max(groups.count(key) for key in set(groups))


def test_folds_exclude_and_balance_without_groups():
    test = [0, 5, 7]
    folds = fold_indices(23, 5, seed=1, exclude=test)
    vals = np.concatenate([fold["val"] for fold in folds])
    assert sorted(vals.tolist()) == sorted(set(range(23)) - set(test))
    assert sorted(len(fold["val"]) for fold in folds) == [4, 4, 4, 4, 4]
    assert all(not set(test) & set(fold["train"].tolist()) for fold in folds)


def test_too_many_folds_raise_one_line():
    groups = ["a"] * 4 + ["b"] * 3 + ["c"] * 3
    with pytest.raises(ValueError, match="--folds 5 needs at least 5 groups but the data has 3") as error:
        fold_indices(10, 5, groups=groups)
    assert "--group-by" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ValueError, match="--folds 4 needs at least 4 samples but the data has 3"):
        fold_indices(3, 4)
    with pytest.raises(ValueError, match="--folds must be an integer of at least 2"):
        fold_indices(10, 1)


# ----------------------------------------------------------------------------- from_directory(group_by=)


def slide_folder(root, slides=6, tiles=3):
    for s in range(slides):
        for t in range(tiles):
            write_pair(root, f"slide{s}_tile{t}", 40 * t + s)
    return root


def test_group_by_keeps_slides_in_one_split(tmp_path):
    slide_folder(tmp_path)
    for seed in range(3):
        data = from_directory(tmp_path, group_by=r"^(slide\d+)_", split=(0.5, 0.25, 0.25), seed=seed)
        groups = json.loads(json.dumps(data.files["groups"]))  # JSON-able
        owner = {}
        for name in SPLIT_NAMES:
            stems = [image.split("/")[-1] for image, _ in data.files[name]]
            assert groups[name] == [stem.split("_")[0] for stem in stems]
            for key in groups[name]:
                assert owner.setdefault(key, name) == name, f"{key} straddles splits"
        assert sorted(owner) == [f"slide{s}" for s in range(6)]
        assert data.counts == {"train": 12, "val": 3, "test": 3}


def test_group_by_whole_match_without_capture_group(tmp_path):
    slide_folder(tmp_path, slides=4, tiles=2)
    data = from_directory(tmp_path, group_by=r"slide\d", split=(0.5, 0.25, 0.25))
    assert sorted(set(sum(data.files["groups"].values(), []))) == ["slide0", "slide1", "slide2", "slide3"]


def test_group_by_matching_nothing_names_the_flag(tmp_path):
    slide_folder(tmp_path, slides=2, tiles=2)
    with pytest.raises(ValueError) as error:
        from_directory(tmp_path, group_by=r"^patient(\d+)")
    assert str(error.value).startswith(r"--group-by '^patient(\d+)' matches none of the 4 image names (e.g. slide0_")


def test_group_by_leaving_files_unmatched_names_them(tmp_path):
    slide_folder(tmp_path, slides=3, tiles=2)
    write_pair(tmp_path, "extra_a", 9)
    write_pair(tmp_path, "extra_b", 10)
    with pytest.raises(ValueError, match="does not match 2 of the 8 image names: extra_a.png, extra_b.png;"):
        from_directory(tmp_path, group_by=r"^(slide\d+)_")


def test_group_by_invalid_regex_and_per_split_layout(tmp_path):
    slide_folder(tmp_path, slides=3, tiles=2)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        from_directory(tmp_path, group_by="(slide")
    split_root = tmp_path / "split"
    slide_folder(split_root / "train", slides=2, tiles=1)
    with pytest.raises(ValueError, match="--group-by only applies to the random split"):
        from_directory(split_root, group_by="slide")


def test_from_arrays_groups_keep_samples_together():
    images = np.repeat(np.arange(12, dtype=np.uint8) * 20, 64).reshape(12, 8, 8, 1)  # sample k is all 20 * k
    masks = (images > 100).astype(np.uint8)
    groups = [k // 3 for k in range(12)]  # 4 groups of 3
    data = from_arrays(images, masks, groups=groups, split=(0.5, 0.25, 0.25), shuffle=False, batch_size=12)
    assert data.counts == {"train": 6, "val": 3, "test": 3}
    for name in SPLIT_NAMES:
        ids = np.round(next(iter(data[name]))[0].numpy()[:, 0, 0, 0] * 255 / 20).astype(int).tolist()
        assert sorted(ids) == sorted(k for k in range(12) if groups[k] in {groups[i] for i in ids})


# ----------------------------------------------------------------------------- from_directory(splits=)


def test_recorded_splits_are_reused_after_files_are_added(tmp_path):
    for k in range(10):
        write_pair(tmp_path, f"a{k}", 20 * k)
    data = from_directory(tmp_path, split=(0.6, 0.2, 0.2), seed=0)
    recorded = json.loads(json.dumps(data.files))  # as splits.json stores it: lists of 2-lists
    new = [write_pair(tmp_path, f"{stem}", 250) for stem in ("0new", "a0x", "zz")]
    assert from_directory(tmp_path, split=(0.6, 0.2, 0.2), seed=0).files["test"] != data.files["test"]
    again = from_directory(tmp_path, splits=recorded, split=(0.6, 0.2, 0.2), seed=0, shuffle=False, batch_size=16)
    for name in SPLIT_NAMES:
        assert again.files[name] == data.files[name]
    listed = {path for name in SPLIT_NAMES for pair in again.files[name] for path in pair}
    assert not listed & {path for pair in new for path in pair}
    values = sorted(np.unique(np.round(next(iter(again.test))[0].numpy() * 255)).tolist())
    assert values == sorted(np.asarray(Image.open(image)).flat[0] for image, _ in data.files["test"])


def test_recorded_split_with_deleted_files_names_them(tmp_path):
    for k in range(6):
        write_pair(tmp_path, f"a{k}", 20 * k)
    data = from_directory(tmp_path, split=(0.5, 0.25, 0.25))
    (image, mask), = data.files["test"][:1]
    (tmp_path / "images" / image.split("/")[-1]).unlink()
    with pytest.raises(FileNotFoundError, match="1 file.s. of the recorded split no longer exist") as error:
        from_directory(splits=data.files)
    assert image in str(error.value) and mask not in str(error.value)
    assert "restore them" in str(error.value)


def test_recorded_split_rejects_malformed_entries(tmp_path):
    pair = write_pair(tmp_path, "a", 10)
    with pytest.raises(ValueError, match="listed in both the train and the test split"):
        from_directory(splits={"train": [pair], "test": [list(pair)]})
    with pytest.raises(ValueError, match="must be an .image, mask. path pair"):
        from_directory(splits={"train": [pair[0]]})


# ----------------------------------------------------------------------------- synthetic cache


def test_synthetic_disk_cache_keeps_splits_apart(tmp_path):
    kwargs = dict(num_samples=12, image_size=(16, 16), split=(0.5, 0.25, 0.25), seed=0, shuffle=False, batch_size=12)
    data = synthetic(cache=str(tmp_path / "c"), **kwargs)
    arrays = {name: next(iter(data[name]))[0].numpy() for name in SPLIT_NAMES}  # train first: writes its cache
    caches = {name: sorted(p.name for p in tmp_path.glob(f"c_{name}*")) for name in SPLIT_NAMES}
    assert all(caches.values()) and not (set(caches["train"]) & set(caches["val"]))
    parts = split_indices(12, (0.5, 0.25, 0.25), seed=0)
    for name in ("val", "test"):
        expected = np.stack([synthetic_sample(i, seed=0, image_size=(16, 16))[0].numpy() for i in parts[name]])
        np.testing.assert_allclose(arrays[name], expected, atol=1e-6)
        assert not any(np.allclose(image, train) for image in arrays[name] for train in arrays["train"])
    cached = synthetic(cache=str(tmp_path / "c"), **kwargs)  # a second run reads the per-split caches
    np.testing.assert_array_equal(next(iter(cached.val))[0].numpy(), arrays["val"])
