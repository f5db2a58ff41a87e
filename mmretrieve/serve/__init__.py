"""``mmretrieve serve``: one warm process serving indexes over HTTP (FastAPI + uvicorn), and a web page.

- ``config.ServeConfig``: every setting, safe defaults (loopback, caps, a bounded heavy queue);
- ``state.IndexManager``: each index's snapshot, one encoder per kind, new versions picked up live;
- ``batching.EncodeBatcher``: concurrent query encodings in one encoder forward;
- ``safety``: token check, safe upload decoding, the heavy queue, the re-ranking policy;
- ``service.Service``: the engine (a request -> a response dict), without HTTP;
- ``app.create_app``: the FastAPI app (``/api/v1``, ``/docs``, ``/healthz``, ``/metrics``, the page at ``/``);
- ``server.serve``: uvicorn.

Needs the ``serve`` extra (``pip install 'mmretrieve[serve]'``). Importing this package imports
neither FastAPI nor torch; the names below load on first use.
"""

from __future__ import annotations

from mmretrieve.registry import lazy_exports

_LAZY = {
    "ServeConfig": "mmretrieve.serve.config",
    "check_bind": "mmretrieve.serve.config",
    "Service": "mmretrieve.serve.service",
    "create_app": "mmretrieve.serve.app",
    "serve": "mmretrieve.serve.server",
}

__getattr__ = lazy_exports("mmretrieve.serve", _LAZY, globals())

__all__ = list(_LAZY)
