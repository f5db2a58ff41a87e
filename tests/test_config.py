from __future__ import annotations

import pytest

from mmretrieve.config import coerce, find_config, load_config, parse_kv, parse_spec
from mmretrieve.registry import Registry


def test_parse_kv_and_spec():
    assert parse_kv("k=100,alpha=0.7,weights=apc,flag=true,x=none") == {
        "k": 100, "alpha": 0.7, "weights": "apc", "flag": True, "x": None,
    }
    assert parse_kv("patches=timm:vit_small_patch14_dinov2.lvd142m,k=5") == {
        "patches": "timm:vit_small_patch14_dinov2.lvd142m", "k": 5,
    }
    assert parse_kv("factory=IVF64,Flat,k=3") == {"factory": "IVF64,Flat", "k": 3}
    assert parse_spec("emd") == ("emd", {})
    assert parse_spec("emd:k=10") == ("emd", {"k": 10})
    with pytest.raises(ValueError, match="expected key=value"):
        parse_kv("=3")
    assert coerce("1e-3") == 1e-3 and coerce("abc") == "abc"


def test_registry_duplicates_refused():
    r = Registry("thing")
    r.register("a")(lambda: 1)
    with pytest.raises(ValueError, match="already registered"):
        r.register("a")(lambda: 2)
    r.register("a", override=True)(lambda: 3)
    assert r.create("a") == 3


def test_configs_are_found(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "mine.yaml").write_text("k: 3\n")
    monkeypatch.chdir(tmp_path)
    assert load_config("mine") == {"k": 3}
    assert find_config(tmp_path / "configs" / "mine.yaml").name == "mine.yaml"
    with pytest.raises(FileNotFoundError, match="config 'nothing' not found"):
        find_config("nothing")
    (tmp_path / "configs" / "bad.yaml").write_text("- a list\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        load_config("bad")
