"""PaddleClas list files (fastcls/data/folder.py): the same index as the folder scan, both
converters and the checker take one, bad lines are one error naming file and line. (Every
decode path reading a list, and the demo from list files: the matrix in test_data.py.)"""
import json
import subprocess
from pathlib import Path

import pytest

from fastcls.data import DatasetError, build_loader, scan_folder
from fastcls.data.folder import read_classes, read_list

from conftest import CPU, PY, ROOT, loader_cfg, run_env

pytestmark = pytest.mark.usefixtures("one_thread")


def write_list(folder: Path, out: Path, root: Path = None, classes: str = "") -> Path:
    """A list of `folder`'s images (folder scan order), paths relative to `root` (default:
    the list's folder), and optionally a class file `classes` next to it."""
    idx = scan_folder(str(folder))
    base = root or out.parent
    lines = [f"{Path(p).relative_to(base)} {label}" for p, label in idx.samples]
    out.write_text("# PaddleClas list\n" + "\n".join(lines) + "\n\n")
    if classes == "names":
        (out.parent / "classes.txt").write_text("\n".join(idx.classes) + "\n")
    elif classes == "ids":
        (out.parent / "classes.txt").write_text("".join(f"{i} {c} (class {c})\n"
                                                        for i, c in enumerate(idx.classes)))
    return out


def test_list_equals_folder_index(folder):
    idx = scan_folder(str(folder))
    lst = write_list(folder, folder.parent / "train_list.txt", classes="names")
    got = read_list(str(lst), classes_file=str(folder.parent / "classes.txt"))
    assert got.samples == idx.samples and got.classes == idx.classes == ["a", "b", "c"]
    assert got.empty_classes == [] and got.root == str(folder.parent)
    (folder.parent / "classes.txt").unlink()
    write_list(folder, lst, classes="ids")  # PaddleClas's class_id_map_file form
    assert read_list(str(lst), classes_file=str(folder.parent / "classes.txt")).classes == \
        ["a (class a)", "b (class b)", "c (class c)"]
    plain = read_list(str(lst))  # no class file: numbered
    assert plain.classes == ["0", "1", "2"] and plain.samples == idx.samples


def test_root_exclude_and_repeats(folder, tmp_path, monkeypatch):
    (tmp_path / "elsewhere").mkdir()
    lst = write_list(folder, tmp_path / "elsewhere" / "l.txt", root=folder)
    with pytest.raises(DatasetError, match="does not exist"):
        read_list(str(lst))  # relative to the list's folder: wrong
    idx = read_list(str(lst), root=str(folder))
    assert len(idx.samples) == 18 and idx.root == str(folder)
    ex = tmp_path / "ex.txt"
    ex.write_text(f"a/00.jpg\n{folder / 'b' / '01.jpg'}\n")
    from fastcls.data import read_exclude
    assert read_list(str(lst), root=str(folder), exclude=read_exclude(str(ex))).excluded == 2
    monkeypatch.chdir(folder.parent)  # a relative data.root: the absolute entry still matches
    assert read_list(str(lst), root=folder.name, exclude=read_exclude(str(ex))).excluded == 2
    monkeypatch.undo()
    lst.write_text(lst.read_text() + "a/00.jpg 0\n")  # listed twice
    assert len(read_list(str(lst), root=str(folder)).samples) == 19  # training: oversampled
    with pytest.raises(DatasetError, match=r"line 21: repeats line 2 .*scored once"):
        read_list(str(lst), "data.val", root=str(folder), allow_repeats=False)


@pytest.mark.parametrize("line, classes, message", [
    ("a/nope.jpg 0", "", r"line 3: file 'a/nope.jpg' does not exist"),
    ("a/00.jpg zero", "", r"line 3: label 'zero' is not an integer"),
    ("a/00.jpg 3", "names", r"line 3: label 3 is outside 0..2 \(the 3 classes of .*classes.txt\)"),
    ("a/00.jpg 5", "", r"line 3: label 5 is outside 0..3 \(model.num_classes=4\)"),
    ("a/00.jpg -1", "", r"line 3: label -1 is outside 0..3"),
    ("a/00.jpg", "", r"line 3: expected 'relative/path label', got 'a/00.jpg'"),
])
def test_bad_line_is_one_error_naming_file_and_line(folder, line, classes, message):
    lst = folder / "list.txt"
    write_list(folder, lst, root=folder, classes=classes)
    lines = lst.read_text().splitlines()
    lines.insert(2, line)
    lines.append("b/none.jpg 1")  # a second bad line: counted, not listed
    lst.write_text("\n".join(lines))
    cf = str(folder / "classes.txt") if classes else ""
    with pytest.raises(DatasetError, match=rf"data.train: .*list.txt: {message}.*\(and 1 more bad lines\)"):
        read_list(str(lst), classes_file=cf, num_classes=4)
    cfg = loader_cfg(lst, classes_file=cf)
    with pytest.raises(DatasetError, match=r"data.train: .*list.txt: line 3: "):
        build_loader(cfg, "train", CPU)  # the same line through the loader
    if "does not exist" in message:
        r = subprocess.run([PY, "-m", "fastcls.train", "pipelines/demo.yaml", f"data.train={lst}",
                            f"data.val={lst}", f"train.out_dir={folder}/run"], cwd=ROOT, env=run_env(),
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "Traceback" not in r.stderr and "line 3" in r.stderr


def test_class_file_errors(tmp_path):
    (tmp_path / "c.txt").write_text("0 a\n2 b\n")
    with pytest.raises(DatasetError, match="line 2: class id 2, expected 1"):
        read_classes(str(tmp_path / "c.txt"))
    (tmp_path / "c.txt").write_text("a\nb\na\n")
    with pytest.raises(DatasetError, match="names class 'a' twice"):
        read_classes(str(tmp_path / "c.txt"))
    with pytest.raises(DatasetError, match="cannot read"):
        read_classes(str(tmp_path / "none.txt"))
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DatasetError, match="is not a text list file"):
        read_list(str(tmp_path / "bin.txt"))


def test_converters_and_check_take_a_list(folder, tmp_path):
    lst = write_list(folder, tmp_path / "train_list.txt", root=folder, classes="names")
    args = ["--root", str(folder), "--classes", str(tmp_path / "classes.txt"), "--no-progress"]
    r = subprocess.run([PY, "-m", "fastcls.tools.convert", "--to", "wds", str(lst), str(tmp_path / "s"),
                        *args], env=run_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "s" / "train.shards.json").read_text())  # prefix: train_list -> train
    assert meta["classes"] == ["a", "b", "c"] and meta["num_samples"] == 18
    (folder / "a" / "00.jpg").write_text("<html>not an image</html>")
    r = subprocess.run([PY, "-m", "fastcls.tools.check", str(lst), "--root", str(folder), "--no-progress"],
                       env=run_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stdout.startswith(str(folder / "a" / "00.jpg"))
    pytest.importorskip("ffcv")
    r = subprocess.run([PY, "-m", "fastcls.tools.convert", "--to", "ffcv", str(lst), str(tmp_path / "t.beton"),
                        "--max-bad-fraction", "0.1", "--workers", "1", *args],
                       env=run_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "t.beton.json").read_text())
    assert meta["classes"] == ["a", "b", "c"] and meta["num_samples"] == 17 and len(meta["skipped"]) == 1
