"""Faults while export and predict_files write: SIGKILL at many instants, a full disk, read-only folders.

The kill tests run the real work in child processes and SIGKILL them at delays spread over the
part of a full run that changes the output folder: a delay counts from the child's first change
on disk (seen by polling the folder), as a fraction of that span in a full run.
One server process imports unetpp_tf once and forks a child per kill, so a handful of kills
costs seconds instead of a TensorFlow import each.
"""

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

import unetpp_tf
from unetpp_tf import files, inference
from unetpp_tf.export import TFLiteModel, export_model, exporter

KILL_FRACTIONS = (0.05, 0.3, 0.55, 0.8, 0.97)  # of the part of a full run that changes the folder
NEW_EXPORT = {"export_report.json", "model_float32.tflite"}

SERVER = textwrap.dedent('''
    """Run each trial in a forked child and SIGKILL it after its delay (a fraction of a full run)."""
    import json, os, signal, sys, time, traceback
    from pathlib import Path
    import numpy as np
    import unetpp_tf
    from unetpp_tf import files

    spec = json.loads(open(sys.argv[1]).read())

    def export(out):
        model = unetpp_tf.load_model(spec["model"])
        unetpp_tf.export.export_model(model, out, formats="tflite", image_size=(32, 32),
                                      samples=[np.load(spec["samples"])])

    def predict(out):
        unetpp_tf.predict_files(spec["model"], [spec["images"]], out)

    def between_renames(out):  # die right after the old folder is moved aside, before the new one lands
        replace = os.replace

        def dying_replace(source, target):
            replace(source, target)
            if os.path.basename(str(target)).startswith(files.PREVIOUS_PREFIX):
                os.kill(os.getpid(), signal.SIGKILL)

        files.os.replace = dying_replace
        with files.staged_directory(out) as staging:
            (staging / "new.txt").write_text("new")

    def listing(folder):
        return sorted((str(p), p.stat().st_mtime_ns) for p in Path(folder).rglob("*"))

    work = {"export": export, "predict": predict, "between_renames": between_renames}
    results, writing = [], {}  # writing: work -> seconds from its first change on disk to its end
    for trial in spec["trials"]:
        parent = Path(trial["out"]).parent
        before = listing(parent)
        start = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            try:
                work[trial["work"]](trial["out"])
            except BaseException:
                traceback.print_exc()
                os._exit(1)
            os._exit(0)
        changed, status = None, None
        while changed is None:  # wait for the child's first change on disk (or its end)
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if listing(parent) != before:
                changed = time.perf_counter()
            time.sleep(0.002)
        if trial["fraction"] is None:  # a full run: how long it changes the folder
            if changed is not None:
                _, status = os.waitpid(pid, 0)
            writing[trial["work"]] = time.perf_counter() - (changed or start)
        elif changed is not None:  # kill at this fraction of that span after the first change
            time.sleep(trial["fraction"] * writing[trial["work"]])
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
        results.append({**trial, "killed": os.WIFSIGNALED(status), "exit_code": os.WEXITSTATUS(status),
                        "seconds": time.perf_counter() - start})
    print(json.dumps({"results": results, "writing": writing}))
''')


def _tree(folder):
    """{relative path: bytes} of every file under folder (None when it does not exist)."""
    folder = Path(folder)
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _model(seed, classes=1):
    keras.utils.set_random_seed(seed)
    return unetpp_tf.build_unetpp((None, None, 1), depth=2, filters=4, num_classes=classes)


@pytest.fixture(scope="module")
def probe():
    return np.random.default_rng(7).random((2, 32, 32, 1), dtype=np.float32)


@pytest.fixture(scope="module")
def old_and_new(tmp_path_factory, probe):
    """An old export and masks of model A (2 classes) on disk, model B (1 class) saved for the children.

    With other classes, an old report beside a new file (or the reverse) cannot pass for either."""
    root = tmp_path_factory.mktemp("faults")
    old_model, new_model = _model(1, classes=2), _model(2)
    new_model.save(root / "new.keras")
    samples = unetpp_tf.data.synthetic(4, image_size=(32, 32), batch_size=4).train.take(1)
    samples = np.concatenate([x for x, _ in samples.as_numpy_iterator()])
    export_model(old_model, root / "old_export", formats="tflite", image_size=(32, 32), samples=[samples])
    images = root / "images"
    images.mkdir()
    for k, image in enumerate(np.random.default_rng(3).random((12, 128, 120))):  # writing lasts a while
        Image.fromarray((image * 255).astype(np.uint8)).save(images / f"img{k}.png")
    inference.predict_files(old_model, [images], root / "old_masks")
    inference.predict_files(new_model, [images], root / "new_masks")
    return {"root": root, "old": old_model, "new": new_model, "images": images, "samples": samples}


@pytest.fixture(scope="module")
def kills(old_and_new):
    """Run every kill trial once; each trial has its own copy of the old output to write over."""
    root = old_and_new["root"]
    trials = []
    plan = [("export", None)] + [("export", f) for f in KILL_FRACTIONS] + [("between_renames", None)]
    plan += [("predict", None)] + [("predict", f) for f in KILL_FRACTIONS]
    for k, (work, fraction) in enumerate(plan):
        out = root / f"trial{k}" / "out"
        shutil.copytree(root / ("old_masks" if work == "predict" else "old_export"), out)
        trials.append({"work": work, "fraction": fraction, "out": str(out)})
    np.save(root / "samples.npy", old_and_new["samples"])
    spec = {"model": str(root / "new.keras"), "images": str(old_and_new["images"]),
            "samples": str(root / "samples.npy"), "trials": trials}
    (root / "spec.json").write_text(json.dumps(spec))
    (root / "server.py").write_text(SERVER)
    package_root = str(Path(unetpp_tf.__file__).parents[1])  # the children run the unetpp_tf under test
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(root / "server.py"), str(root / "spec.json")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _visible(folder):
    return sorted(p.name for p in Path(folder).iterdir() if not p.name.startswith("."))


def _export_state(out, old_tree, new_model, probe):
    """'old' (byte for byte), 'new' (complete, every file loads and is model B's) or 'none'."""
    tree = _tree(out)
    if tree is None:
        return "none"
    if tree == old_tree:
        return "old"
    assert set(_visible(out)) == NEW_EXPORT, f"a mix of old and new entries: {_visible(out)}"
    report = json.loads((out / "export_report.json").read_text())
    (artifact,) = report["artifacts"]
    assert report["num_classes"] == 1 and artifact["size_bytes"] == (out / "model_float32.tflite").stat().st_size
    lite = TFLiteModel(out / "model_float32.tflite")
    assert lite.metadata["num_classes"] == 1
    np.testing.assert_allclose(lite(probe), new_model.predict(probe, verbose=0), atol=1e-4)
    return "new"


def test_export_killed_at_any_instant_leaves_the_old_or_the_new_export(kills, old_and_new, probe):
    old_tree = _tree(old_and_new["root"] / "old_export")
    states = []
    for result in kills["results"]:
        if result["work"] != "export":
            continue
        out = Path(result["out"])
        state = _export_state(out, old_tree, old_and_new["new"], probe)
        assert state != "none", f"killed after {result['seconds']:.2f}s: the export folder vanished"
        states.append(state)
        if state == "old":  # what is there loads
            assert TFLiteModel(out / "model_float32.tflite").num_classes == 2
    full_run = kills["results"][0]
    assert states[0] == "new" and not full_run["killed"] and full_run["exit_code"] == 0
    assert "old" in states  # the early kills landed before the swap


def test_a_kill_between_the_two_renames_is_undone_by_the_next_writer(kills, old_and_new, probe):
    (result,) = [r for r in kills["results"] if r["work"] == "between_renames"]
    assert result["killed"], "the child was to kill itself between the renames"
    out = Path(result["out"])
    assert not out.exists()  # the one instant with no folder: the old one waits beside it
    (previous,) = [p for p in out.parent.iterdir() if p.name.startswith(files.PREVIOUS_PREFIX)]
    old_tree = _tree(old_and_new["root"] / "old_export")
    assert _tree(previous) == old_tree
    with files.staged_directory(out) as staging:  # the next writer puts the old folder back first
        (staging / "note.txt").write_text("added")
    assert _tree(out) == {**old_tree, "note.txt": b"added"}
    assert not [p for p in out.parent.iterdir() if p.name.startswith(files.PREVIOUS_PREFIX)]


def test_predict_files_killed_at_any_instant_leaves_old_or_new_masks(kills, old_and_new):
    root = old_and_new["root"]
    old, new = _tree(root / "old_masks"), _tree(root / "new_masks")
    assert old.keys() == new.keys() and any(old[name] != new[name] for name in old)
    seen = set()
    for result in kills["results"]:
        if result["work"] != "predict":
            continue
        out = Path(result["out"])
        assert _visible(out) == sorted(old), "only complete masks under their final names"
        for name, content in _tree(out).items():
            if name.startswith("."):
                continue  # a staged temporary file of the killed run
            assert content in (old[name], new[name]), f"{name} is neither the old nor the new mask"
            seen.add("old" if content == old[name] else "new")
            with Image.open(out / name) as image:
                image.load()  # decodes: never a truncated PNG
    assert "old" in seen  # the early kills landed before the masks were replaced


def test_full_disk_during_export_is_one_clear_error_and_the_old_export_stays(old_and_new, tmp_path, monkeypatch,
                                                                             probe):
    out = tmp_path / "export"
    shutil.copytree(old_and_new["root"] / "old_export", out)
    before, parent_before = _tree(out), sorted(os.listdir(tmp_path))

    def full_disk(path, content):
        Path(path).write_bytes(content[: len(content) // 3])
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(exporter, "write_tflite", full_disk)
    with pytest.raises(OSError, match=f"no space left on the device while writing {out}") as info:
        export_model(old_and_new["new"], out, formats="tflite", image_size=(32, 32), samples=[probe])
    assert info.value.errno == errno.ENOSPC and "\n" not in str(info.value) and "intact" in str(info.value)
    assert _tree(out) == before and sorted(os.listdir(tmp_path)) == parent_before
    np.testing.assert_allclose(TFLiteModel(out / "model_float32.tflite")(probe),
                               old_and_new["old"].predict(probe, verbose=0), atol=1e-4)


def test_full_disk_during_predict_files_keeps_the_old_masks(old_and_new, tmp_path, monkeypatch):
    out = tmp_path / "masks"
    shutil.copytree(old_and_new["root"] / "old_masks", out)
    before = _tree(out)
    written = []

    def full_disk(array):
        def write(temp):
            if written:
                Path(temp).write_bytes(b"\x89PNG partial")
                raise OSError(errno.ENOSPC, "No space left on device", str(temp))
            written.append(temp)
            Image.fromarray(array).save(temp, format="PNG")
        return write

    monkeypatch.setattr(inference, "_write_png", full_disk)
    with pytest.raises(OSError, match=f"no space left on the device while writing {out / 'img1.png'}"):
        inference.predict_files(old_and_new["new"], [old_and_new["images"]], out)
    assert _tree(out) == before


@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """A folder nobody may write into. Root ignores permission bits, so for root `os.access`
    answers for this folder as the kernel answers any other user."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    (folder / "kept.txt").write_text("old")
    folder.chmod(0o555)
    if os.geteuid() == 0:
        access = os.access

        def as_a_user(path, mode, *args, **kwargs):
            if Path(path).absolute() == folder and mode & os.W_OK:
                return False
            return access(path, mode, *args, **kwargs)

        monkeypatch.setattr(os, "access", as_a_user)
    yield folder
    folder.chmod(0o755)


def test_read_only_output_folder_is_refused_before_any_work(read_only, old_and_new, probe, monkeypatch):
    parent_before = sorted(os.listdir(read_only.parent))
    monkeypatch.setattr(exporter, "collect_images", lambda *args: pytest.fail("export started working"))
    message = f"cannot write {read_only}: permission denied .*choose a writable folder"
    with pytest.raises(PermissionError, match=message) as info:
        export_model(old_and_new["new"], read_only, formats="tflite", image_size=(32, 32), samples=[probe])
    assert "\n" not in str(info.value)
    monkeypatch.setattr(inference, "predict", lambda *args, **kwargs: pytest.fail("predict_files started working"))
    with pytest.raises(PermissionError, match=message):
        inference.predict_files(old_and_new["new"], [old_and_new["images"]], read_only)
    assert sorted(os.listdir(read_only.parent)) == parent_before and _visible(read_only) == ["kept.txt"]


@pytest.mark.parametrize("working_folder", [False, True])
def test_staged_directory_keeps_other_entries_and_replaces_its_own(tmp_path, monkeypatch, working_folder):
    folder = tmp_path / "export"
    (folder / "notes").mkdir(parents=True)
    (folder / "notes" / "a.txt").write_text("keep me")
    (folder / "model.tflite").write_text("old")
    if working_folder:  # renaming the working folder would move the process: entries are replaced one by one
        monkeypatch.chdir(folder)
        with pytest.warns(UserWarning, match="replaced one by one"):
            with files.staged_directory(folder) as staging:
                (staging / "model.tflite").write_text("new")
    else:
        with files.staged_directory(folder) as staging:
            (staging / "model.tflite").write_text("new")
        assert not staging.exists()
    assert _tree(folder) == {"model.tflite": b"new", "notes/a.txt": b"keep me"}
    assert sorted(os.listdir(tmp_path)) == ["export"] and not [p for p in os.listdir(folder) if p.startswith(".")]
