"""Where a request's engine handles end: the one place that cancels them, however the answer ends.

The mechanism is vLLM's `with_cancellation` (vllm/entrypoints/utils.py): the answer races a
listener for the client's `http.disconnect`, and whichever finishes first cancels the other. vLLM races the
route handler and leaves a streamed answer to Starlette's StreamingResponse, which watches again;
here the race runs around the sending of the answer itself (a stream outlives its handler), from
the moment the request is submitted, and one `finally` cancels the handle. So these all end there:
- the client goes before the first chunk, mid-stream, or while it waits for a non-streamed answer:
  the listener wins, the answer's task is cancelled;
- the server shuts down: uvicorn cancels the request's task after its graceful timeout;
- the answer fails (an error event, a bug): the exception leaves through the `finally`.
Cancelling a finished request is a no-op, so the normal end goes the same way. A response may hold
several engine requests (/v1/completions with a list of prompts): all are submitted and all cancelled.
"""
from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from service.engine import Engine, GenerationRequest, RequestHandle


async def listen_for_disconnect(receive: Receive) -> None:
    """Returns once the client has gone. Only for a request whose body has been read: it consumes
    (and drops) whatever else the server delivers."""
    while (await receive())["type"] != "http.disconnect":
        pass


class GenerationResponse(Response):
    """The answer to prepared requests, as a response: submitting them, sending what `respond` makes
    of their handles (a JSONResponse once complete, or an event stream), and cancelling the handles."""

    def __init__(self, engine: Engine, requests: list[GenerationRequest], arrived: float,
                 respond: Callable[[list[RequestHandle]], Awaitable[Response]]):
        self.engine, self.requests, self.arrived, self.respond = engine, requests, arrived, respond
        self.background = None  # the route machinery sets it; nothing runs after the answer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handles: list[RequestHandle] = []
        tasks: list[asyncio.Future] = []
        try:
            # Submitted here, not in the route, so that no moment separates a handle from the
            # `finally` (a full queue refusing the second request cancels the first).
            for request in self.requests:
                handles.append(self.engine.submit(request, asyncio.get_running_loop(), self.arrived))
            tasks = [asyncio.ensure_future(self._answer(handles, scope, send)),
                     asyncio.ensure_future(listen_for_disconnect(receive))]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # First, before anything here waits: at shutdown the engine stops right after uvicorn
            # has cancelled the requests. A queued request leaves the queue now, a running one the
            # batch at its next step.
            for handle in handles:
                handle.cancel()
            for task in tasks:
                task.cancel()  # a no-op when it is done
            await asyncio.gather(*tasks, return_exceptions=True)  # neither outlives the request
        answer = tasks[0]
        if not answer.cancelled():
            answer.result()  # its error, if any, goes to the error handlers

    async def _answer(self, handles: list[RequestHandle], scope: Scope, send: Send) -> None:
        response = await self.respond(handles)
        await response(scope, _no_receive, send)  # the listener above owns `receive`


async def _no_receive() -> dict:
    raise RuntimeError("the answer's response reads nothing from the client")
