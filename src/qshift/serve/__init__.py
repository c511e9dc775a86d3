"""``qshift serve``: online test-time adaptation behind an HTTP API (docs/serve.md).

- :mod:`qshift.serve.inputs` — JSON queries (base64 images, local paths, texts) to model inputs, validated;
- :mod:`qshift.serve.service` — the adapter, its gallery and identity, built from ``qshift run``'s specs;
- :mod:`qshift.serve.batcher` — request coalescing and the one worker thread that owns the adapter;
- :mod:`qshift.serve.checkpoints` — atomic checkpoints of the adaptation state, and resuming from them;
- :mod:`qshift.serve.app` — the FastAPI app: endpoints, JSON schemas, errors, authentication.

Importing this package loads nothing; its modules need the ``serve`` extra (FastAPI, uvicorn).
"""
