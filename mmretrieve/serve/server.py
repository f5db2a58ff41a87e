"""Running the app under uvicorn: one process (the indexes and models loaded before the port opens),
or ``--workers N`` processes, each loading its own copy (uvicorn's factory mode)."""

from __future__ import annotations

import logging
import os
import time

from mmretrieve.serve.config import ServeConfig, check_bind

log = logging.getLogger(__name__)

CONFIG_ENV = "MMRETRIEVE_SERVE_CONFIG"


def _uvicorn_options(config: ServeConfig) -> dict:
    """uvicorn's settings: the header deadline on every connection (``serve.protection``); no
    ``limit_concurrency``, which counts idle connections too (the guard counts requests in progress)."""
    from mmretrieve.serve.protection import http_protocol

    return dict(host=config.host, port=int(config.port), log_level="warning", server_header=False,
                timeout_keep_alive=max(1, int(config.header_timeout_s)), timeout_graceful_shutdown=10,
                proxy_headers=False, http=http_protocol(config.header_timeout_s), backlog=2048)


def raise_open_files_limit() -> int:
    """The process's soft limit of open files raised to its hard limit (each client holds one until the
    header deadline closes it); returns the soft limit now in force."""
    try:
        import resource
    except ImportError:  # not on this platform
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    return soft


def apply_threads(config: ServeConfig) -> None:
    """The process's torch threads (FAISS and BLAS keep theirs): a process-wide setting, made here and
    not by ``Service``, so a service embedded in another program leaves that program's choice alone."""
    if config.torch_threads:
        import torch

        torch.set_num_threads(int(config.torch_threads))


def serve(config: ServeConfig, *, print_fn=print, encoders: dict | None = None) -> int:
    """Check the bind rule, load everything, print where the page is, serve until interrupted."""
    try:
        import uvicorn
    except ImportError:
        from mmretrieve.errors import MissingDependencyError

        raise MissingDependencyError("mmretrieve serve needs FastAPI and uvicorn: pip install 'mmretrieve[serve]'") from None
    config.check()
    raise_open_files_limit()
    notice = check_bind(config.host, config.token)
    host = f"[{config.host}]" if ":" in config.host else config.host
    base = f"http://{host}:{config.port}"
    if config.workers > 1:
        os.environ[CONFIG_ENV] = config.to_json()
        print_fn(notice)
        print_fn(f"starting {config.workers} worker processes (each loads the indexes); page: {base}/  API docs: {base}/docs")
        uvicorn.run("mmretrieve.serve.server:app_factory", factory=True, workers=config.workers,
                    **_uvicorn_options(config))
        return 0
    from mmretrieve.serve.app import create_app
    from mmretrieve.serve.service import Service

    apply_threads(config)
    t0 = time.perf_counter()
    service = Service(config, encoders=encoders).start()
    names = ", ".join(f"{n} ({len(h.index)} items, {h.version})" for n, h in service.manager.handles.items())
    print_fn(f"loaded {names} in {time.perf_counter() - t0:.1f} s")
    print_fn(notice)
    print_fn(f"page: {base}/   API: {base}/api/v1   docs: {base}/docs   metrics: {base}/metrics")
    try:
        uvicorn.run(create_app(service), **_uvicorn_options(config))
    finally:
        service.close()
    return 0


def app_factory():
    """uvicorn's factory for ``--workers N``: the config comes from the parent through the environment."""
    from mmretrieve.serve.app import create_app
    from mmretrieve.serve.service import Service

    config = ServeConfig.from_json(os.environ[CONFIG_ENV])
    apply_threads(config)
    return create_app(Service(config).start())


__all__ = ["serve", "app_factory", "apply_threads", "raise_open_files_limit", "CONFIG_ENV"]
