"""`vlm serve`: an OpenAI-compatible HTTP server over one loaded model.

    schemas.py   the request body (pydantic) and the OpenAI error shape
    messages.py  OpenAI chat messages -> our messages + images (data:, http(s), local files)
    stops.py     stop strings over streamed text
    engine.py    continuous batching: one thread owns the model; requests join the running
                 batch at step boundaries and leave when they finish
    app.py       the FastAPI app: routes, API key, body limit, SSE streaming, errors

Preprocessing, prompt construction and sampling are the shared ones (vlmcli.pipeline,
vlmcli.generate); the server adds only the batch around them.
"""
