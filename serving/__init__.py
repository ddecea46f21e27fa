"""Serving: faiss index lifecycle, HTTP API, Ray Serve application and web page.

Imports only from `retrieval/` (never trainers/ or mining/). Ray is imported only by
`serving.app`; `serving.index`, `serving.engine` and `serving.ingress` run without it.
"""
