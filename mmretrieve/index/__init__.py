"""The read side: open an index snapshot, look items up, search it (``Index``, ``open_index``)."""

from mmretrieve.index.index import Index, ReadView, open_index

__all__ = ["Index", "ReadView", "open_index"]
