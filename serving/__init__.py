"""Serving: faiss index lifecycle, HTTP API, Ray Serve application and web page.

Imports only from `retrieval/` (never trainers/ or mining/). Ray is imported only by
`raytrieval.serving.app`; `raytrieval.serving.index`, `raytrieval.serving.engine` and `raytrieval.serving.ingress` run without it.
"""
