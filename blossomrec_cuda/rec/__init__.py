"""The recommender built on blossomrec_cuda: BlossomRec, its dense baseline SASRec, data readers,
metrics and the training command (``python -m blossomrec_cuda.rec.train``). A trained model loads
with ``BlossomRec.from_checkpoint(path)`` and answers ``model.recommend(histories, k)`` in raw item
ids (docs/RECOMMENDER.md). This subpackage imports the core package, never the reverse; the RecBole
adapter (``recbole_adapter``) is imported on demand."""
from .model import BlossomRec, SASRec, build_model

__all__ = ["BlossomRec", "SASRec", "build_model"]
