"""One ``BuildOptions`` for every way of building: its checks, its one spelling in Python and on the
command line, and its trip to Ray workers (pickle)."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest

from mmretrieve import UsageError
from mmretrieve.errors import UnknownOptionError
from mmretrieve.ingest import BuildOptions, add_to_index, build_index
from mmretrieve.store import read_manifest


@pytest.mark.parametrize("kw, msg", [
    ({"batch_size": 0}, "batch_size: expected a positive integer, got 0"),
    ({"workers": True}, "workers: expected a positive integer, got True"),
    ({"engine": "spark"}, "engine: expected one of local, ray, got 'spark'"),
    ({"decode": "tpu"}, "decode: expected one of auto, cpu, gpu, got 'tpu'"),
    ({"on_bad_vectors": "zero"}, "on_bad_vectors: expected one of error, drop, got 'zero'"),
    ({"vector_dtype": "int8"}, "vector_dtype: expected one of float32, float16, got 'int8'"),
    ({"image_timeout": -1}, "image_timeout: expected seconds > 0, got -1"),
    ({"patches": "yes"}, "patches: expected true/false"),
    ({"video": 16}, "video: expected a dict"),
])
def test_bad_options_are_refused_by_name(kw, msg):
    with pytest.raises(UsageError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        BuildOptions(**kw)


def test_unknown_keywords_name_the_valid_ones(tmp_path):
    with pytest.raises(UnknownOptionError, match=r"'batchsize' for build_index.*did you mean 'batch_size'"):
        build_index(tmp_path / "i", tmp_path, batchsize=8)
    with pytest.raises(UnknownOptionError, match=r"'patches' for add_to_index \(the index keeps its own"):
        add_to_index(tmp_path / "i", tmp_path, patches=True)


def test_options_are_normalised_once_and_travel_by_pickle():
    o = BuildOptions(factory=" IVF4,Flat ", vector_dtype="FLOAT16", decode="CPU", video={"num_frames": 4})
    assert (o.factory, o.vector_dtype, o.decode) == ("IVF4,Flat", "float16", "cpu")
    assert pickle.loads(pickle.dumps(o)) == o  # the Ray driver's workers get the same object
    assert BuildOptions.of(o, batch_size=8) == BuildOptions(**{**o.to_dict(), "batch_size": 8})
    with pytest.raises(AttributeError):
        o.batch_size = 3  # frozen: a run cannot change its options halfway


def test_the_command_line_and_python_make_the_same_index(tmp_path, samples, embedded):
    from mmretrieve.cli import main

    folder = tmp_path / "photos"
    folder.mkdir()
    for s in samples[:4]:
        shutil.copy(s.path, folder / f"{s.id}{Path(s.path).suffix}")
    argv = ["index", "build", "cli", str(folder), "--index-dir", str(tmp_path), "--patches", "--vector-dtype", "float16",
            "--batch-size", "2", "--retain", "3"]
    assert main(argv) == 0
    build_index("py", folder, index_dir=tmp_path, encoder="embedded", patches=True, vector_dtype="float16", batch_size=2,
                retain=3)
    a, b = read_manifest(tmp_path / "cli"), read_manifest(tmp_path / "py")
    for key in ("factory", "vector_dtype", "patches", "video", "retain", "counts"):
        assert a.get(key) == b.get(key), key
    assert a["build"]["options"] == b["build"]["options"]
