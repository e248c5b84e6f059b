"""The HTTP side of cqil-serve: a Starlette app with OpenAI's routes over one Batcher.

    POST /v1/completions         text in, text out (stream: server-sent events)
    POST /v1/chat/completions    messages under the engine's chat template
    GET  /v1/models              the one model served
    GET  /health                 200 while the batcher runs and its last step succeeded, else 503

Handlers parse and tokenize on the event loop, hand a Ticket to the batcher thread and wait for
its events; a client that disconnects (streaming or not) has its ticket cancelled, which frees
its rows at the next step boundary. Every error is OpenAI's error object with its status; an
unexpected one is a 500 and is logged, and the server goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from cqil.errors import first_line
from cqil.serve import protocol
from cqil.serve.batcher import Batcher, Ticket
from cqil.serve.protocol import ApiError

log = logging.getLogger("cqil")
MAX_BODY = 32 * 2**20  # bytes of one request body


class Service:
    """What the routes share: the engine, its tokenizer, the served name and the batcher."""

    def __init__(self, engine, model_name: str, max_batch: int = 32, max_queue: int = 256):
        self.engine, self.model_name, self.max_batch = engine, model_name, max_batch
        self.tokenizer = engine.tokenizer
        self.batcher = Batcher(engine, self.tokenizer, max_batch, max_queue)
        self.created = int(time.time())


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


class EventStream(StreamingResponse):
    """Server-sent events that stop (and run the body's cleanup) as soon as the client disconnects,
    whichever ASGI spec version the server speaks."""

    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send):
        async with anyio.create_task_group() as group:
            async def respond():
                try:
                    await self.stream_response(send)
                except OSError:  # the client went away while we were writing
                    pass
                group.cancel_scope.cancel()

            group.start_soon(respond)
            await self.listen_for_disconnect(receive)
            group.cancel_scope.cancel()


def build_app(service: Service) -> Starlette:
    async def completions(request: Request):
        return await _generate(request, service, "completion")

    async def chat_completions(request: Request):
        return await _generate(request, service, "chat")

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [{
            "id": service.model_name, "object": "model", "created": service.created, "owned_by": "cqil",
            "max_model_len": service.engine.max_seq_len}]})

    async def health(request: Request):
        ok = service.batcher.alive and service.batcher.healthy
        b = service.batcher
        return JSONResponse({"status": "ok" if ok else "unavailable", "running": b.running_rows, "waiting": b.waiting,
                             "answered": b.answered, "steps": b.steps, "tokens": b.tokens,
                             "peak_rows": b.peak_rows},
                            status_code=200 if ok else 503)

    async def http_error(request: Request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                       type=kind))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.batcher.start()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(service.batcher.stop)

    return Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]),
                             Route("/v1/chat/completions", chat_completions, methods=["POST"]),
                             Route("/v1/models", models, methods=["GET"]),
                             Route("/health", health, methods=["GET"])],
                     exception_handlers={HTTPException: http_error}, lifespan=lifespan)


async def _generate(request: Request, service: Service, kind: str):
    try:
        try:
            body = json.loads(await _body(request))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        job = protocol.parse_request(kind, body, service)
        ticket = Ticket(job, asyncio.get_running_loop(), service.tokenizer)
        service.batcher.submit(ticket)
    except ApiError as e:
        return error_response(e)
    except Exception as e:  # a bug: answer, log, keep serving
        log.exception("unexpected error while parsing a request")
        return error_response(ApiError(500, f"internal error: {type(e).__name__}: {first_line(e)}", "server_error"))
    if job.stream:
        return EventStream(_events(ticket, service), headers={"Cache-Control": "no-cache"})
    return await _whole(request, ticket, service)


async def _body(request: Request) -> bytes:
    """The request body, refused (413) past MAX_BODY bytes before more of it is read."""
    too_large = ApiError(413, f"the request body exceeds {MAX_BODY // 2**20} MiB")
    if int(request.headers.get("content-length") or 0) > MAX_BODY:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def _whole(request: Request, ticket: Ticket, service: Service):
    """Wait for the ticket's end, or the client's disconnect (which cancels it)."""
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        while True:
            get = asyncio.ensure_future(ticket.events.get())
            await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                get.cancel()
                service.batcher.cancel(ticket)
                return JSONResponse({}, status_code=499)  # nobody reads it
            event = get.result()
            if event[0] == "error":
                return error_response(ApiError(event[1], event[2], type="server_error"))
            if event[0] == "done":
                return JSONResponse(protocol.response(ticket.job, ticket.outputs, service.tokenizer))
    finally:
        gone.cancel()


async def _disconnected(request: Request):
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _events(ticket: Ticket, service: Service):
    job, tokenizer = ticket.job, service.tokenizer
    offsets = [0] * len(ticket.outputs)

    def sse(body: dict) -> str:
        return f"data: {json.dumps(body)}\n\n"

    try:
        if job.kind == "chat":
            for i in range(len(ticket.outputs)):
                yield sse(protocol.chunk(job, i, None, None, role=True))
        while True:
            event = await ticket.events.get()
            if event[0] == "error":
                yield sse(ApiError(event[1], event[2], type="server_error").body())
                break
            if event[0] == "done":
                if job.include_usage:
                    yield sse(protocol.usage_chunk(job, ticket.outputs))
                break
            _, i, text, logprobs, finish_reason = event
            yield sse(protocol.chunk(job, i, text, finish_reason, logprobs, tokenizer, offsets[i]))
            offsets[i] += sum(len(protocol.token_text(tokenizer, lp.token)) for lp in logprobs)
        yield "data: [DONE]\n\n"
    finally:
        if ticket.open:  # the client left early: its rows leave the batch
            service.batcher.cancel(ticket)
