"""Codec server: lets the Temporal Web UI and CLI show decrypted payloads (`python -m codec_server`).

Speaks Temporal's codec-server protocol: `POST /encode` and `POST /decode` with a JSON body
`{"payloads": [...]}` (protobuf JSON of `temporalio.api.common.v1.Payload`), answering the same
shape. It holds `PAYLOAD_KEYS`, so run it where only operators reach it (behind your SSO), then set
the Web UI's "Codec Server" endpoint to its URL, or `temporal workflow show --codec-endpoint URL`.

    python -m codec_server --port 8081 --allow-origin http://127.0.0.1:8233
"""

from __future__ import annotations

import argparse

import uvicorn
from google.protobuf import json_format
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from temporalio.api.common.v1 import Payloads

from settings import Settings
from temporal_client import EncryptionCodec, parse_keys


def create_app(codec: EncryptionCodec, allow_origins: list[str]) -> Starlette:
    async def apply(request: Request, encode: bool) -> Response:
        try:
            payloads = json_format.Parse(await request.body(), Payloads())
        except json_format.ParseError as exc:
            return JSONResponse({"error": f"body is not a Payloads JSON object: {exc}"}, status_code=400)
        try:
            out = await (codec.encode if encode else codec.decode)(list(payloads.payloads))
        except Exception as exc:  # noqa: BLE001 - a wrong key or a tampered payload: say which
            return JSONResponse({"error": str(exc)}, status_code=400)
        return Response(json_format.MessageToJson(Payloads(payloads=out)), media_type="application/json")

    async def encode(request: Request) -> Response:
        return await apply(request, True)

    async def decode(request: Request) -> Response:
        return await apply(request, False)

    return Starlette(
        routes=[Route("/encode", encode, methods=["POST"]), Route("/decode", decode, methods=["POST"])],
        middleware=[Middleware(CORSMiddleware, allow_origins=allow_origins, allow_methods=["POST"],
                               allow_headers=["content-type", "x-namespace", "authorization"])],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--allow-origin", action="append", default=[],
                        help="Web UI origin allowed to call it (repeatable), e.g. http://127.0.0.1:8233")
    args = parser.parse_args()
    spec = Settings().payload_keys.get_secret_value()
    if not spec:
        raise SystemExit("error: PAYLOAD_KEYS is empty: there is nothing to decode with")
    app = create_app(EncryptionCodec(parse_keys(spec)), args.allow_origin)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
