"""`logo serve`: an OpenAI-compatible HTTP server that routes every request with LoGo, batches concurrent
requests into shared forward passes (each row keeps its own mixture) and streams tokens as they come.

Layers, top to bottom: ``cli`` (the ``serve`` and ``loadtest`` commands) -> ``api`` (FastAPI routes, errors,
auth, streaming) -> ``scheduler`` (one worker thread that owns the model: continuous batching) ->
``batch_cache`` (merge / drop rows of a KV cache) and ``sampling`` (per-row seeded sampling), with
``schemas`` (pydantic request / response bodies) and ``metrics`` (Prometheus) beside them.
"""
