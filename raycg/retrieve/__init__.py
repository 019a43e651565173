"""Candidate generation from a run's export: raw request context -> top-K item ids.

    from raycg.retrieve import Retriever
    ids, scores = Retriever("runs/<name>/export").retrieve(user_id=42, surface="home", k=100)

`retriever` (the API and the Ray Data batch mode), `requests` (the request format and its
checks), `tables` / `index` / `build` (what the export holds and how it is written).
Command line: `python -m raycg.retrieve export_dir=... user_id=... k=...`.
"""
from raycg.retrieve.requests import RequestError  # noqa: F401

__all__ = ["RequestError", "Retriever", "retrieve_parquet"]


def __getattr__(name: str):
    # the retriever loads torch and faiss: imported on first use, so the command line's own
    # errors (a missing export_dir=, a bad request) come back without loading them
    if name in ("Retriever", "retrieve_parquet"):
        from raycg.retrieve import retriever

        return getattr(retriever, name)
    raise AttributeError(f"module 'raycg.retrieve' has no attribute {name!r}")
