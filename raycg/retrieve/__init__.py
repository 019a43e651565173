"""Candidate generation from a run's export: raw request context -> top-K item ids.

    from raycg.retrieve import Retriever
    ids, scores = Retriever("runs/<name>/export").retrieve(user_id=42, surface="home", k=100)

`retriever` (the API and the Ray Data batch mode), `requests` (the request format and its
checks), `tables` / `index` / `build` (what the export holds and how it is written).
Command line: `python -m raycg.retrieve export_dir=... user_id=... k=...`.
"""
from raycg.retrieve.requests import RequestError  # noqa: F401
from raycg.retrieve.retriever import Retriever, retrieve_parquet  # noqa: F401
