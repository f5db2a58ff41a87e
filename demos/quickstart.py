"""The Python API in one page, offline: index the packaged sample photos, query them, grow and shrink.

    python demos/quickstart.py [--out DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import mmretrieve as mr
from mmretrieve.media.samples import sample_images, write_manifest


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="working folder (default: a temporary one)")
    out = Path(ap.parse_args().out or tempfile.mkdtemp(prefix="mmretrieve-quickstart-"))
    samples = sample_images()
    by_id = {s.id: s for s in samples}

    # 1) a manifest gives every photo a short id and a caption; a plain folder works too
    manifest = write_manifest(samples[:-3], out / "photos.csv")
    report = mr.build_index(out / "index", manifest, encoder="embedded", patches=True)
    print("build:", report.summary())

    idx = mr.open_index(out / "index")
    print("\ntext query 'a photo of a cat':")
    print(idx.search(text="a photo of a cat", k=3).table())

    print("\nimage query (the left view of the motorcycle):")
    print(idx.search(image=by_id["motorcycle_left"].path, k=3).table())

    print("\ncomposed query: [motorcycle] + 'a horse', sum vs intersection fusion:")
    for fusion in ("sum", "intersection"):
        res = idx.search(image=by_id["motorcycle_left"].path, text="a horse", fusion=fusion, k=3)
        print(f"  {fusion:12s}", res.keys)

    # 2) grow: only new or changed files are encoded; 3) shrink: by key, path or id
    more = write_manifest(samples, out / "photos.csv")
    print("\nadd:", mr.add_to_index(out / "index", more).summary())
    print("removed", mr.remove_from_index(out / "index", ["gravel", "grass"]), "items")
    print("info:", mr.open_index(out / "index").info()["counts"])


if __name__ == "__main__":
    main()
