"""cqil-serve: an OpenAI-compatible HTTP server over one engine, with continuous batching.

    protocol.py   OpenAI's request fields -> Job, results and stream chunks -> JSON, errors
    batcher.py    the thread that steps one running Generator; requests join and leave between steps
    app.py        the Starlette routes (/v1/completions, /v1/chat/completions, /v1/models, /health)
    server.py     uvicorn on a socket (in the foreground, or in a thread for tests and embedding)
    cli.py        the command line

It sits above the runtime, beside the other drivers: the Generator stays the one decode loop.
See docs/serving.md.
"""
