"""A Shoal HTTP function in Python, built with componentize-py.

  GET  /hello-py?name=x     -> "hello, x"
  POST /hello-py/count      -> increments "hits" in bucket "default"
  GET  /hello-py/greeting   -> the `greeting` config value
  POST /hello-py/publish    -> publishes the body on topic "orders"

The Runtime ABI comes in as modules generated from its WIT
(`wit_world.imports.*`); a refused call raises `Err` holding the ABI's
error value.
"""

import re
from urllib.parse import parse_qs, urlsplit

from componentize_py_types import Err, Ok
from wit_world import exports
from wit_world.imports import atomics, pubsub, wasi_config_store, wasi_keyvalue_store
from wit_world.imports.streams import StreamError_Closed
from wit_world.imports.wasi_http_types import (
    Fields,
    IncomingRequest,
    Method_Post,
    OutgoingBody,
    OutgoingResponse,
    ResponseOutparam,
)

# The most of a request body this function reads.
MAX_BODY = 256 * 1024


class IncomingHandler(exports.IncomingHandler):
    def handle(self, request: IncomingRequest, response_out: ResponseOutparam) -> None:
        target = urlsplit(request.path_with_query() or "/")
        action = target.path.rstrip("/").rsplit("/", 1)[-1]
        post = isinstance(request.method(), Method_Post)
        try:
            if action == "count" and post:
                hits = atomics.increment(wasi_keyvalue_store.open("default"), "hits", 1)
                status, text = 200, f"{hits}\n"
            elif action == "greeting":
                greeting = wasi_config_store.get("greeting")
                status, text = (404, "no greeting configured\n") if greeting is None else (200, f"{greeting}\n")
            elif action == "publish" and post:
                pubsub.publish("orders", read_body(request))
                status, text = 202, "published\n"
            else:
                name = parse_qs(target.query).get("name", ["world"])[0]
                status, text = 200, f"hello, {name}\n"
        except Err as refused:
            status, text = 403, f"refused: {describe(refused.value)}\n"
        respond(response_out, status, text)


def read_body(request: IncomingRequest) -> bytes:
    body = request.consume()
    stream = body.stream()
    data = bytearray()
    try:
        while len(data) < MAX_BODY:
            data += stream.blocking_read(MAX_BODY - len(data))
    except Err as err:
        if not isinstance(err.value, StreamError_Closed):
            raise
    finally:
        stream.__exit__(None, None, None)
    return bytes(data)


def respond(response_out: ResponseOutparam, status: int, text: str) -> None:
    headers = Fields.from_list([("content-type", b"text/plain; charset=utf-8")])
    response = OutgoingResponse(headers)
    response.set_status_code(status)
    body = response.body()
    ResponseOutparam.set(response_out, Ok(response))
    stream = body.write()
    data = text.encode()
    # blocking-write-and-flush takes at most 4096 bytes a call.
    for start in range(0, len(data), 4096):
        stream.blocking_write_and_flush(data[start : start + 4096])
    stream.__exit__(None, None, None)
    OutgoingBody.finish(body, None)


def describe(error: object) -> str:
    """An ABI error value as its WIT case: `Error_AccessDenied()` -> "access-denied"."""
    case = type(error).__name__.split("_", 1)[-1]
    kind = re.sub(r"(?<!^)(?=[A-Z])", "-", case).lower()
    value = getattr(error, "value", None)
    return kind if value is None else f"{kind}: {value}"
