"""Every image of the corpus of qcow2 files written by other tools (tests/data/corpus,
see its README and MANIFEST.tsv) against qemu-img: info fields, full content, each
snapshot's content, check, map. Images QEMU refuses (QCOW version 1) and images with an
external data file (not supported here) must give a clean Qcow2Error.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import qemu_img

import qcow2
from qcow2.checkcmd import check_file

CORPUS = Path(__file__).parent / "data" / "corpus"
CHUNK = 4 << 20
_ZERO = bytes(CHUNK)


def _manifest() -> list[dict[str, str]]:
    with open(CORPUS / "MANIFEST.tsv", newline="") as f:
        rows = [line for line in f if not line.startswith("#")]
    return list(csv.DictReader(rows, delimiter="\t"))


ROWS = _manifest()
IMAGES = [r["file"] for r in ROWS if r["role"] == "image"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The corpus decompressed (names without .gz), each file verified against the
    manifest's sha256."""
    out = tmp_path_factory.mktemp("corpus")
    for row in ROWS:
        name = row["file"]
        stored = CORPUS / (name if name.endswith(".gz") else name + ".gz")
        blob = stored.read_bytes()
        data = gzip.decompress(blob)
        digest = hashlib.sha256(blob if name.endswith(".gz") else data).hexdigest()
        assert digest == row["sha256"], f"{name}: not the file the manifest describes"
        dest = out / (name[:-3] if name.endswith(".gz") else name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
    return out


def test_manifest_lists_every_stored_file():
    stored = {str(p.relative_to(CORPUS)) for p in CORPUS.rglob("*.gz")}
    listed = {n if n.endswith(".gz") else n + ".gz" for n in (r["file"] for r in ROWS)}
    assert stored == listed
    assert all(r["license"] for r in ROWS)


def _qemu_json(*args: str) -> Any:
    p = qemu_img(*args, check=False)
    if p.returncode:
        return None
    return json.loads(p.stdout)


def _dump(src: Any, dest: Path) -> None:
    """Our reading of src into a sparse raw file (zero chunks are not written)."""
    size = src.size
    with open(dest, "wb") as f:
        f.truncate(size)
        for pos in range(0, size, CHUNK):
            data = src.pread(min(CHUNK, size - pos), pos)
            if data != _ZERO[: len(data)]:
                f.seek(pos)
                f.write(data)


def _same_content(a: Path, b: Path, fmt_b: str = "raw") -> bool:
    p = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", fmt_b, str(a), str(b)],
                       capture_output=True, text=True)
    return p.returncode == 0


INFO_KEYS = ("virtual-size", "cluster-size", "dirty-flag", "backing-filename",
             "backing-filename-format", "full-backing-filename")
SPECIFIC_KEYS = ("compat", "compression-type", "lazy-refcounts", "refcount-bits", "corrupt",
                 "extended-l2", "bitmaps")
SNAP_KEYS = ("id", "name", "vm-state-size", "date-sec", "date-nsec", "vm-clock-sec",
             "vm-clock-nsec", "icount")


@pytest.mark.parametrize("name", IMAGES)
def test_corpus_image(corpus, tmp_path, name):
    path = corpus / (name[:-3] if name.endswith(".gz") else name)
    theirs = _qemu_json("info", "--output=json", str(path))
    q = subprocess.run(["qemu-img", "check", "--output=json", str(path)], capture_output=True,
                       text=True)
    try:
        img = qcow2.open(path)
    except qcow2.Qcow2Error as exc:
        # only where QEMU refuses too, for a feature documented as unsupported, or for
        # an image qemu-img check calls corrupt (tables past the end of the file, a
        # snapshot table on the header): reads refuse, check reports (below)
        specific = (theirs or {}).get("format-specific", {}).get("data", {})
        assert theirs is None or theirs.get("format") != "qcow2" or "data-file" in specific \
            or q.returncode == 2, f"{name}: we refuse ({exc}) an image qemu-img reads"
        if q.returncode != 2:
            return
    else:
        _compare_reading(img, name, path, theirs, tmp_path)
    # check (read-only): same exit code and counts
    rep = check_file(path)
    assert rep.exit_code == q.returncode, (name, rep.to_dict(), q.stdout, q.stderr)
    if q.stdout.strip():
        tq = json.loads(q.stdout)
        for k in ("corruptions", "leaks", "check-errors"):
            assert rep.to_dict().get(k, 0) == tq.get(k, 0), (name, k)


def _compare_reading(img: qcow2.Image, name: str, path: Path, theirs: Any,
                     tmp_path: Path) -> None:
    with img:
        assert theirs is not None and theirs["format"] == "qcow2", name
        ours = img.info()
        for k in INFO_KEYS:
            assert ours.get(k) == theirs.get(k), (name, k)
        ods, tds = ours["format-specific"]["data"], theirs["format-specific"]["data"]
        for k in SPECIFIC_KEYS:
            assert ods.get(k) == tds.get(k), (name, k)
        osn, tsn = ours.get("snapshots", []), theirs.get("snapshots", [])
        assert [{k: s.get(k) for k in SNAP_KEYS} for s in osn] == \
            [{k: s.get(k) for k in SNAP_KEYS} for s in tsn], name
        # map
        assert img.map() == _qemu_json("map", "--output=json", str(path)), name
        # content: the active state, then every snapshot
        ours_raw = tmp_path / "ours.raw"
        _dump(img, ours_raw)
        assert _same_content(ours_raw, path, "qcow2"), f"{name}: content differs"
        for sn in img.snapshots:
            _dump(img.snapshot(sn.id), ours_raw)
            ref = tmp_path / "theirs.raw"
            qemu_img("convert", "-O", "raw", "-l", f"snapshot.id={sn.id}", str(path), str(ref))
            assert _same_content(ours_raw, ref), f"{name}: snapshot {sn.id} differs"
