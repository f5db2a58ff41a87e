"""One error hierarchy: every error a user can cause is an ``MMRetrieveError``.

Catch ``MMRetrieveError`` to handle anything mmretrieve refuses, or a branch of it::

    MMRetrieveError
    ├── UsageError          a bad option, value, name or combination (also a ValueError)
    │   ├── UnknownNameError      no encoder / reranker / fusion / dataset by that name (also a KeyError)
    │   ├── UnknownOptionError    an option a function, fusion or reranker does not take
    │   ├── ConfigNotFoundError   a preset or YAML file that does not exist (also a FileNotFoundError)
    │   ├── DeviceError           a device that is asked for but not there, e.g. cuda (also a RuntimeError)
    │   └── FilterError           a search filter (``where=``) that does not parse, naming the token and its position
    ├── InputError          bad input data: a file, a manifest row, a vector (also a ValueError)
    │   ├── SourceNotFoundError   the folder / manifest to index is missing (also a FileNotFoundError)
    │   ├── ManifestError         a manifest that cannot be read, with file and line
    │   ├── BadImageError         one image cannot be used (ingest skips it and reports why)
    │   ├── BadVideoError         one video cannot be used
    │   └── BadVectorsError       NaN / inf / zero / wrong-length embeddings
    ├── StoreError          the on-disk index
    │   ├── IndexNotFoundError    (also a FileNotFoundError)
    │   ├── IndexExistsError      (also a FileExistsError)
    │   ├── IndexCorruptedError   a file that fails its checks, named
    │   ├── IndexLockedError      another process is writing
    │   ├── EncoderMismatchError  the query encoder differs from the index's (also a ValueError)
    │   ├── DiskFullError         no space left while writing a file, named (also an OSError); nothing published
    │   ├── VersionNotFoundError  a version that is not (or no longer) kept (also a KeyError)
    │   └── ItemNotFoundError     no item with that id / key / path (also a KeyError)
    │       └── ItemChangedError  an item's file is no longer what was indexed (the service answers 410)
    ├── IngestError
    │   └── SkippedInputsError    ``strict`` and some inputs were skipped: nothing was written
    ├── EncoderError        a model that cannot be created or cannot do what was asked
    │   └── EncoderUnavailableError  the index's own encoder cannot be loaded here (item / vector searches still work)
    ├── RerankError         a reranker that cannot run (e.g. no model given, no patches stored)
    │   ├── NoPatchesError        the index stores no patch features (also a LookupError)
    │   ├── MLLMError
    │   └── OTConvergenceError
    ├── DatasetError        a benchmark folder or file in the wrong layout (also a ValueError)
    │   └── SubmissionError       a ranking / submission file in the wrong format
    ├── MissingDependencyError    an optional package is not installed; says which extra (also an ImportError)
    ├── TrainingError       a training run that cannot go on as asked (``mmretrieve train``; also a RuntimeError)
    └── ServeError          what the HTTP service refuses (``mmretrieve serve``), each with its status code
        ├── UnauthorizedError     a missing or wrong API token (401; also a PermissionError)
        ├── PayloadTooLargeError  an upload or request body over the cap (413)
        ├── SlowRequestError      a request body below the minimum rate (408; also a TimeoutError)
        ├── ServiceBusyError      the bounded queue of heavy requests is full (503, with Retry-After)
        └── RequestTimeoutError   a request that ran past its time limit (504; also a TimeoutError)

Messages name the file, option or value at fault. The extra builtin bases keep ``except ValueError`` /
``except KeyError`` / ``except FileNotFoundError`` code working.

This module imports nothing heavy: it is safe to import anywhere.
"""

from __future__ import annotations

import os


class MMRetrieveError(Exception):
    """Base class of every error mmretrieve raises on purpose."""


# ---- usage -----------------------------------------------------------------------------------------
class UsageError(MMRetrieveError, ValueError):
    """A bad option, value, name or combination of them."""


class UnknownNameError(UsageError, KeyError):
    """A registry has no entry under the requested name."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class UnknownOptionError(UsageError, TypeError):
    """An option that a function, fusion or reranker does not take (the message lists those it does)."""


class ConfigNotFoundError(UsageError, FileNotFoundError):
    """A preset name or YAML path that does not exist."""


class DeviceError(UsageError, RuntimeError):
    """A device that was asked for is not available here (e.g. ``cuda`` without a GPU)."""


class FilterError(UsageError):
    """A search filter (``where=``, ``--where``, the API's ``filter``) that does not parse or cannot be
    applied; the message names the token or field and its position (1-based character)."""


# ---- input -----------------------------------------------------------------------------------------
class InputError(MMRetrieveError, ValueError):
    """Bad input data."""


class SourceNotFoundError(InputError, FileNotFoundError):
    """The folder or manifest to index does not exist."""


class ManifestError(InputError):
    """A manifest (CSV / JSONL) that cannot be used; the message names the file and the line."""


class BadImageError(InputError):
    """An input image could not be used; ``reason`` is short and machine-friendly."""

    def __init__(self, path: str | os.PathLike | None, reason: str) -> None:
        self.path = str(path) if path is not None else None
        self.reason = reason
        super().__init__(f"{self.path}: {reason}" if self.path else reason)


class BadVideoError(InputError):
    """An input video could not be used; ``reason`` is short."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class BadVectorsError(InputError):
    """Embeddings that are NaN, infinite, zero or of the wrong shape."""


# ---- store -----------------------------------------------------------------------------------------
class StoreError(MMRetrieveError):
    """Base class of index store errors."""


class IndexNotFoundError(StoreError, FileNotFoundError):
    pass


class IndexExistsError(StoreError, FileExistsError):
    pass


class IndexCorruptedError(StoreError):
    pass


class IndexLockedError(StoreError):
    pass


class EncoderMismatchError(StoreError, ValueError):
    pass


class DiskFullError(StoreError, OSError):
    """The disk filled while a file was written; the message names the file. Nothing was published."""


class VersionNotFoundError(StoreError, KeyError):
    """A version that the index does not (or no longer) keep."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ItemNotFoundError(StoreError, KeyError):
    """No item with that id, key or path in the index."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ItemChangedError(ItemNotFoundError):
    """An item's file (or shard) is no longer what was indexed: modified, or replaced by a symlink; its
    new bytes are never served (HTTP 410)."""


# ---- ingest ----------------------------------------------------------------------------------------
class IngestError(MMRetrieveError):
    pass


class SkippedInputsError(IngestError):
    """``strict=True`` and some inputs were skipped: nothing was published; ``report`` lists them."""

    def __init__(self, report) -> None:
        self.report = report
        first = report.skipped[0]
        super().__init__(
            f"{len(report.skipped)} input(s) skipped in strict mode (nothing written), e.g. {first.uri}: {first.reason}"
        )


# ---- models ----------------------------------------------------------------------------------------
class EncoderError(MMRetrieveError, RuntimeError):
    """An encoder could not be created or cannot do what was asked (e.g. text on an image-only model)."""


class EncoderUnavailableError(EncoderError):
    """The index's own encoder cannot be loaded here (an imported index's model name, weights not cached
    offline): queries that need encoding fail with this; searches by stored item or by vector still work."""


class RerankError(MMRetrieveError, RuntimeError):
    """A reranker cannot run as configured."""


class NoPatchesError(RerankError, LookupError):
    """The index (or an item) has no stored patch features and none may be computed."""


class MLLMError(RerankError):
    pass


class EndpointError(MLLMError):
    """An OpenAI-compatible endpoint could not answer (unreachable, refused, or failed past its retries);
    ``status`` is the last HTTP status, or None when no answer came."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class OTConvergenceError(RerankError):
    pass


# ---- evaluation ------------------------------------------------------------------------------------
class DatasetError(MMRetrieveError, ValueError):
    pass


class SubmissionError(DatasetError):
    pass


class MissingDependencyError(MMRetrieveError, ImportError):
    """An optional package is missing; the message says what to install."""


# ---- training -----------------------------------------------------------------------------------------
class TrainingError(MMRetrieveError, RuntimeError):
    """A training run that cannot go on as asked (no layer to adapt, too little data, a resumed run
    whose settings differ)."""


# ---- the HTTP service -------------------------------------------------------------------------------
class ServeError(MMRetrieveError):
    """What the HTTP service refuses; ``status`` is the HTTP status code it answers with."""

    status: int = 400


class UnauthorizedError(ServeError, PermissionError):
    """A request without the API token, or with a wrong one."""

    status = 401


class SlowRequestError(ServeError, TimeoutError):
    """A request body that did not arrive at the minimum rate (a slow-body client holds no slot for long)."""

    status = 408


class PayloadTooLargeError(ServeError):
    """An upload or a request body over the server's cap."""

    status = 413


class ServiceBusyError(ServeError):
    """The bounded queue of heavy (re-ranking) requests is full; ``retry_after`` is in seconds."""

    status = 503

    def __init__(self, message: str, retry_after: int = 1) -> None:
        self.retry_after = int(retry_after)
        super().__init__(message)


class RequestTimeoutError(ServeError, TimeoutError):
    """A request that ran past the server's per-request time limit."""

    status = 504


__all__ = [
    "MMRetrieveError", "EndpointError", "UsageError", "UnknownNameError", "UnknownOptionError", "ConfigNotFoundError",
    "InputError", "SourceNotFoundError", "ManifestError", "BadImageError", "BadVideoError", "BadVectorsError",
    "StoreError", "IndexNotFoundError", "IndexExistsError", "IndexCorruptedError", "IndexLockedError",
    "EncoderMismatchError", "DiskFullError", "VersionNotFoundError", "ItemNotFoundError", "ItemChangedError", "IngestError", "SkippedInputsError", "EncoderError", "EncoderUnavailableError",
    "RerankError", "NoPatchesError", "MLLMError", "DeviceError", "FilterError", "OTConvergenceError", "DatasetError", "SubmissionError", "MissingDependencyError",
    "TrainingError",
    "ServeError", "UnauthorizedError", "PayloadTooLargeError", "SlowRequestError", "ServiceBusyError", "RequestTimeoutError",
]
