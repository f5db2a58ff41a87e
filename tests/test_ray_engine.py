"""The Ray engine against the local engine on the same input: Ray's local mode (started and stopped by
the engine) and a 2-node cluster simulated on this machine (``ray.cluster_utils.Cluster``, loopback only,
a temp dir of the test's own), so data really moves between raylets. Marked ``ray``: ``make test`` runs
them as a second step."""

from __future__ import annotations

import ipaddress
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from mmretrieve.errors import UsageError
from mmretrieve.index import open_index
from mmretrieve.ingest import build_index
from mmretrieve.testing.shards import truncate, write_webdataset

ray = pytest.importorskip("ray", reason="the Ray engine needs the ray extra")
pytestmark = pytest.mark.ray


@pytest.fixture()
def ray_tmp(monkeypatch):
    """A short temp dir of the test's own (Ray's socket paths must stay under the kernel's 107 bytes)."""
    d = tempfile.mkdtemp(prefix="mmr-ray-", dir="/tmp")
    os.makedirs(os.path.join(d, "ray"))  # where Ray notes the address of the cluster it started
    monkeypatch.setenv("RAY_TMPDIR", d)
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    from ray._private import ray_constants

    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)  # what the variable gives when read at import
    yield d
    if ray.is_initialized():
        ray.shutdown()
    shutil.rmtree(d, ignore_errors=True)


def _state(name):
    idx = open_index(name)
    items = sorted(idx.meta.iter_items(), key=lambda it: it.key)
    vecs = idx.vectors([it.id for it in items])
    rows = {it.key: (it.id, it.uri, it.kind, it.caption, it.width, it.height) for it in items}
    skipped = sorted((s.key, s.reason) for s in idx.meta.skipped())
    return rows, dict(zip((it.key for it in items), vecs)), skipped


def _assert_same(a, b, atol=1e-6):
    assert a[0] == b[0]  # the same items with the same ids
    assert a[2] == b[2]  # the same skips, with the same reasons
    for k, v in a[1].items():
        np.testing.assert_allclose(v, b[1][k], atol=atol)


@pytest.fixture()
def shards(tmp_path, samples):
    bad = [("broken.jpg", b"\xff\xd8\xff\xe0 not a jpeg", "a corrupt member")]
    paths = write_webdataset(list(samples[:9]) + bad + list(samples[9:]), tmp_path / "wds", per_shard=6)
    truncate(paths[-1], 0.7)
    return tmp_path / "wds"


def _listening() -> set[tuple[str, int]]:
    """(address, port) of every listening TCP socket on this machine (IPv4-mapped IPv6 as IPv4)."""
    out = set()
    for f in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(f).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if parts[3] != "0A":  # LISTEN
                continue
            addr, port = parts[1].split(":")
            raw = b"".join(int(addr[i : i + 8], 16).to_bytes(4, "little") for i in range(0, len(addr), 8))
            ip = ipaddress.ip_address(raw)
            ip = getattr(ip, "ipv4_mapped", None) or ip
            out.add((str(ip), int(port, 16)))
    return out


def test_local_mode_gives_the_local_engines_index(ray_tmp, shards, tiny_clip):
    build_index("local", shards, encoder=tiny_clip, batch_size=4)
    r = build_index("ray", shards, encoder=tiny_clip, batch_size=4, engine="ray")
    assert not ray.is_initialized()  # the engine started Ray and stopped it
    assert r.engine == "ray" and r.ray["actors"] >= 1 and r.units_committed == 3
    assert {"ray_start", "decode", "encode", "write"} <= set(r.stages)
    _assert_same(_state("ray"), _state("local"))


def test_repeated_keys_on_ray_as_on_the_local_engine(ray_tmp, tmp_path, samples, tiny_clip):
    """Keys repeated across shards, one of the repeats broken: the first sample keeps each key."""
    from mmretrieve.testing.shards import write_tar as tar

    d = tmp_path / "dups"
    d.mkdir()
    ph = [Path(s.path) for s in samples[:4]]
    tar(d / "00000.tar", [(f"a{ph[0].suffix}", ph[0].read_bytes()), (f"b{ph[1].suffix}", ph[1].read_bytes())])
    tar(d / "00001.tar", [("a.jpg", b"\xff\xd8\xff\xe0 not a jpeg"), (f"c{ph[2].suffix}", ph[2].read_bytes())])
    tar(d / "00002.tar", [(f"b{ph[3].suffix}", ph[3].read_bytes())])
    build_index("local", d, encoder=tiny_clip, batch_size=2)
    build_index("ray", d, encoder=tiny_clip, batch_size=2, engine="ray")
    got, want = _state("ray"), _state("local")
    _assert_same(got, want)
    assert sorted(want[0]) == ["a", "b", "c"] and all(v[1].startswith(str(d / "00000.tar")) for k, v in want[0].items() if k != "c")


def test_local_mode_folder_with_videos_and_a_broken_file(ray_tmp, tmp_path, samples, tiny_clip, bad_files):
    from mmretrieve.media.samples import sample_videos

    d = tmp_path / "mixed"
    d.mkdir()
    for s in samples[:7]:
        shutil.copyfile(s.path, d / Path(s.path).name)
    videos = [v for v in sample_videos() if v.id == "bikes"]
    if not videos:
        pytest.skip("the sample clip is missing")
    shutil.copyfile(videos[0].path, d / Path(videos[0].path).name)
    shutil.copyfile(bad_files["text.jpg"][0], d / "text.jpg")
    opts = {"batch_size": 3, "unit_items": 4, "video": {"num_frames": 4}}
    build_index("local", d, encoder=tiny_clip, **opts)
    r = build_index("ray", d, encoder=tiny_clip, engine="ray", **opts)
    assert r.units_committed == 2 and len(r.skipped) == 1
    got, want = _state("ray"), _state("local")
    _assert_same(got, want)
    assert sum(1 for v in got[0].values() if v[2] == "video") == 1


def test_the_engines_own_ray_listens_on_loopback_only(ray_tmp, monkeypatch):
    """Started by the engine (no address): every socket Ray opens is on loopback, on a machine with other
    interfaces too, even when Ray was imported before the environment was set (as here, at collection)."""
    from ray._private import ray_constants

    from mmretrieve.ingest.ray_engine import ray_session

    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)  # as a Ray imported without the variable
    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    before = _listening()
    with ray_session(num_cpus=1) as r:
        opened = _listening() - before
        assert r.is_initialized()
    assert opened and all(ipaddress.ip_address(ip).is_loopback for ip, _ in opened), opened
    assert not ray.is_initialized()  # stopped, as it was started here
    assert ray_constants.ENABLE_RAY_CLUSTER  # the caller's setting is back


def test_two_node_cluster_gives_the_local_engines_index(ray_tmp, shards, tiny_clip):
    from ray.cluster_utils import Cluster

    build_index("local", shards, encoder=tiny_clip, batch_size=4)
    before = _listening()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "temp_dir": ray_tmp, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, _temp_dir=ray_tmp, log_to_driver=False)
        assert cluster.address.startswith("127.0.0.1:")
        opened = _listening() - before
        assert opened and all(ipaddress.ip_address(ip).is_loopback for ip, _ in opened), opened  # loopback only
        with pytest.raises(UsageError, match="leave no CPU for reading and decoding"):  # not a silent hang
            build_index("too-many", shards, encoder=tiny_clip, engine="ray", ray_actors=8)
        r = build_index("ray", shards, encoder=tiny_clip, batch_size=4, engine="ray", ray_actors=2)
        assert r.ray["nodes"] == 2 and r.ray["work_nodes"] == 2  # both raylets did work for the driver
        _assert_same(_state("ray"), _state("local"))
        assert ray.is_initialized()  # the caller's Ray is left running
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_ivf_on_ray_trains_one_quantizer_like_the_local_engine(ray_tmp, tmp_path, samples, tiny_clip):
    photos = [s for _ in range(4) for s in samples]
    write_webdataset(photos, tmp_path / "wds", per_shard=20)
    opts = {"factory": "IVF2,Flat", "batch_size": 8}
    build_index("local", tmp_path / "wds", encoder=tiny_clip, **opts)
    r = build_index("ray", tmp_path / "wds", encoder=tiny_clip, engine="ray", **opts)
    assert r.units_committed == 1
    _assert_same(_state("ray"), _state("local"))
    a, b = open_index("local"), open_index("ray")
    q = a.vectors([0])
    assert [h.id for h in a.search(vector=q[0], k=10)] == [h.id for h in b.search(vector=q[0], k=10)]
