"""Writing indexes: ``build_index``, ``add_to_index``, ``remove_from_index`` (``build``), over the
reader -> mapper -> writer stages (``stages``), reporting in an ``IngestReport`` (``report``); how a build
runs is one ``BuildOptions`` (``options``)."""

from mmretrieve.ingest.build import add_to_index, build_index, remove_from_index, select_changed
from mmretrieve.ingest.embeddings import add_vectors, import_embeddings, read_embeddings
from mmretrieve.ingest.options import BuildOptions
from mmretrieve.ingest.report import IngestReport

__all__ = ["BuildOptions", "build_index", "add_to_index", "remove_from_index", "select_changed", "IngestReport", "import_embeddings",
           "add_vectors", "read_embeddings"]
