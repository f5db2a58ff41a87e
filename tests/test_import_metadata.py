"""``index import`` carries a parquet's other columns as typed item metadata (and a .npy's ``--metadata``
parquet, row by row): filters over them match a brute force, ``--show`` and facets read them, hostile
column names are renamed or refused clearly, nulls are no value."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from mmretrieve.cli import main  # noqa: E402
from mmretrieve.errors import InputError, UsageError  # noqa: E402
from mmretrieve.index import open_index  # noqa: E402
from mmretrieve.ingest import import_embeddings  # noqa: E402
from mmretrieve.store.filters import evaluate, parse, record_of  # noqa: E402
from mmretrieve.store.meta import Item  # noqa: E402

N, D = 60, 8
LICENSES = ["cc0", "cc-by", None, "mit"]


def _vectors(n=N, seed=0):
    v = np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _columns(n=N):
    return {
        "key": [f"k{i}" for i in range(n)],
        "url": [f"http://x/{i}.jpg" for i in range(n)],
        "caption": [f"a photo number {i}" for i in range(n)],
        "license": [LICENSES[i % 4] for i in range(n)],
        "aesthetic score": [float(i) / 10 if i % 7 else None for i in range(n)],
        "nsfw": [i % 5 == 0 for i in range(n)],
        "year": pa.array([2000 + i % 20 for i in range(n)], pa.int32()),
        "width": [100 + i for i in range(n)],
        "height": [50 + i for i in range(n)],
        "id": [f"orig-{i}" for i in range(n)],
        "kind": ["photo"] * n,
        "année": [i % 3 for i in range(n)],
        "it's": ["q"] * n,
        "tags": [[f"t{i % 3}", "all"] for i in range(n)],
        "exif": [{"iso": 100 * (i % 4), "make": "nikon"} for i in range(n)],
        "blob": [b"\x00\x01"] * n,
        "score_f": [float("nan") if i == 3 else 0.5 for i in range(n)],
    }


@pytest.fixture()
def parquet_index(tmp_path):
    cols = _columns()
    cols["embedding"] = [list(map(float, v)) for v in _vectors()]
    pq.write_table(pa.table(cols), tmp_path / "emb.parquet", row_group_size=16)
    home = tmp_path / "home"
    assert main(["index", "import", "pq", str(tmp_path / "emb.parquet"), "--encoder", "my-model",
                 "--index-dir", str(home), "-q"]) == 0
    return open_index("pq", index_dir=home), home


def test_columns_are_carried_typed(parquet_index):
    index, _ = parquet_index
    hits = {h.key: h for h in index.browse(None, k=N).hits}
    assert len(hits) == N
    h = hits["k1"]
    assert h.caption == "a photo number 1" and h.uri == "k1"
    m = h.metadata
    assert m["url"] == "http://x/1.jpg" and m["license"] == "cc-by" and m["aesthetic score"] == 0.1
    assert m["nsfw"] is False and m["year"] == 2001 and isinstance(m["year"], int)
    assert m["meta_id"] == "orig-1" and m["meta_kind"] == "photo"  # built-in names renamed
    assert m["année"] == 1 and m["it's"] == "q" and m["tags"] == ["t1", "all"] and m["exif"] == {"iso": 100, "make": "nikon"}
    assert "blob" not in m and "embedding" not in m and "key" not in m and "caption" not in m
    assert m["width"] == 101 and m["height"] == 51  # the built-in item fields
    assert "license" not in hits["k2"].metadata  # null: no value
    assert "aesthetic score" not in hits["k0"].metadata and "score_f" not in hits["k3"].metadata  # null, NaN


FILTERS = [
    "license = 'cc0'", "license is null", "license != 'cc0'", "`aesthetic score` > 2.5", "nsfw = true",
    "year >= 2010 and license in ('mit', 'cc-by')", "`année` = 2", "`it's` = 'q'", "exif.iso >= 200",
    "`id` = 'orig-5'", "meta_id = 'orig-5'", "width > 130", "`kind` = 'photo'", "url contains '/1'",
    "not (license = 'cc0') or `aesthetic score` is null",
]


@pytest.mark.parametrize("where", FILTERS)
def test_filters_over_imported_columns_match_a_brute_force(parquet_index, where):
    index, _ = parquet_index
    hits = index.browse(None, k=N).hits
    where = where.replace("`id`", "meta_id").replace("`kind`", "meta_kind")
    tree = parse(where)
    builtin = ("width", "height", "added_at")
    items = [Item(id=h.id, key=h.key, uri=h.uri, caption=h.caption, width=h.metadata.get("width"),
                  extra={k: v for k, v in h.metadata.items() if k not in builtin}) for h in hits]
    expect = sorted(it.id for it in items if evaluate(tree, record_of(it)))
    got = sorted(int(i) for i in index.select(where).ids)
    assert got == expect and (got or where in ("`id` = 'orig-5'",))


def test_search_where_show_and_facets_from_the_cli(parquet_index, capsys):
    index, home = parquet_index
    capsys.readouterr()
    assert main(["search", "pq", "--item", "k0", "--where", "license = 'cc0'", "--show", "license,year",
                 "-k", "50", "--index-dir", str(home)]) == 0
    out = capsys.readouterr().out
    assert "license" in out and "cc0" in out and "cc-by" not in out
    assert main(["search", "pq", "--item", "k0", "--where", "license = 'cc0'", "-k", "50", "--json",
                 "--index-dir", str(home)]) == 0
    rows = json.loads(capsys.readouterr().out)
    hits = rows["hits"] if isinstance(rows, dict) else rows
    assert hits and all(h["metadata"]["license"] == "cc0" for h in hits)
    from mmretrieve.serve.collection import compute_facets

    facets = {f["name"]: f for f in compute_facets(index, "nsfw = false")["fields"]}
    lic = {v["value"]: v["count"] for v in facets["license"]["values"]}
    assert sum(lic.values()) == len(index.select("nsfw = false and license is not null").ids)
    assert facets["year"]["type"] == "number"


def test_columns_and_exclude_columns(tmp_path):
    cols = _columns(10)
    cols["embedding"] = [list(map(float, v)) for v in _vectors(10)]
    pq.write_table(pa.table(cols), tmp_path / "e.parquet")
    home = tmp_path / "home"
    import_embeddings("a", tmp_path / "e.parquet", encoder="m", index_dir=home, columns=["license", "year"])
    m = open_index("a", index_dir=home).browse(None, k=10).hits[1].metadata
    assert {k for k in m if k not in ("added_at",)} == {"license", "year"}
    import_embeddings("b", tmp_path / "e.parquet", encoder="m", index_dir=home,
                      exclude_columns=["url", "tags", "exif", "width", "height", "id", "kind", "année", "it's",
                                       "aesthetic score", "nsfw", "score_f"])
    m = open_index("b", index_dir=home).browse(None, k=10).hits[1].metadata
    assert {k for k in m if k not in ("added_at",)} == {"license", "year"}
    with pytest.raises(InputError, match="no column 'licence'"):
        import_embeddings("c", tmp_path / "e.parquet", encoder="m", index_dir=home, columns=["licence"])


def test_npy_with_a_metadata_parquet(tmp_path):
    np.save(tmp_path / "v.npy", _vectors())
    cols = _columns()
    pq.write_table(pa.table(cols), tmp_path / "meta.parquet", row_group_size=7)
    home = tmp_path / "home"
    assert main(["index", "import", "n", str(tmp_path / "v.npy"), "--metadata", str(tmp_path / "meta.parquet"),
                 "--encoder", "m", "--index-dir", str(home), "-q"]) == 0
    index = open_index("n", index_dir=home)
    hits = {h.key: h for h in index.browse(None, k=N).hits}
    assert len(hits) == N and hits["k7"].metadata["license"] == "mit" and hits["k7"].caption == "a photo number 7"
    # the rows are aligned: item k<i> has vector i
    for i in (0, 33, 59):
        got = index.search(vector=_vectors()[i], k=1).hits[0]
        assert got.key == f"k{i}" and math.isclose(got.score, 1.0, abs_tol=1e-4)
    (tmp_path / "v.keys.txt").write_text("".join(f"f{i}\n" for i in range(N)))  # a keys file wins
    import_embeddings("n2", tmp_path / "v.npy", encoder="m", index_dir=home, metadata=tmp_path / "meta.parquet")
    hits = {h.key: h for h in open_index("n2", index_dir=home).browse(None, k=N).hits}
    assert hits["f2"].metadata["meta_key"] == "k2"


def test_a_row_count_mismatch_names_the_file(tmp_path):
    np.save(tmp_path / "v.npy", _vectors())
    pq.write_table(pa.table(_columns(N - 1)), tmp_path / "meta.parquet")
    with pytest.raises(InputError, match=r"meta\.parquet: 59 rows but .*v\.npy holds 60 vectors"):
        import_embeddings("x", tmp_path / "v.npy", encoder="m", index_dir=tmp_path / "h", metadata=tmp_path / "meta.parquet")
    with pytest.raises(UsageError, match="--metadata is for a .npy"):
        import_embeddings("x", tmp_path / "meta.parquet", encoder="m", index_dir=tmp_path / "h",
                          metadata=tmp_path / "meta.parquet")


@pytest.mark.parametrize("name", ['say "hi"', "tab\there", "", "back\\slash"])
def test_a_name_a_filter_cannot_address_is_refused(tmp_path, name):
    cols = {"key": ["a", "b"], "embedding": [list(map(float, v)) for v in _vectors(2)], name: [1, 2]}
    pq.write_table(pa.table(cols), tmp_path / "e.parquet")
    with pytest.raises(InputError, match="--exclude-columns"):
        import_embeddings("x", tmp_path / "e.parquet", encoder="m", index_dir=tmp_path / "h")
    import_embeddings("x", tmp_path / "e.parquet", encoder="m", index_dir=tmp_path / "h", exclude_columns=[name])


def test_a_renamed_column_that_meets_another_is_refused(tmp_path):
    cols = {"key": ["a"], "embedding": [list(map(float, _vectors(1)[0]))], "kind": ["x"], "meta_kind": ["y"]}
    pq.write_table(pa.table(cols), tmp_path / "e.parquet")
    with pytest.raises(InputError, match="'kind' would be carried as 'meta_kind'"):
        import_embeddings("x", tmp_path / "e.parquet", encoder="m", index_dir=tmp_path / "h")
