"""A minimal disaggregated-prefill proxy (aiohttp).

    python e2e/vllm/disagg_proxy.py --port 8100 --prefill http://127.0.0.1:8001 \
        --decode http://127.0.0.1:8002

For each ``POST /v1/completions`` it sends the request with ``max_tokens=1`` (not streamed)
to the prefill instance (a ``kv_producer``, which stores the prompt's KV in the node server)
and, once that answered, the original request to the decode instance (a ``kv_consumer``,
which loads the KV instead of computing it) and relays the decode instance's answer.
"""

from __future__ import annotations

import argparse
import json
import logging

from aiohttp import ClientSession, ClientTimeout, web

log = logging.getLogger("disagg-proxy")


def build_app(prefill_url: str, decode_url: str) -> web.Application:
    app = web.Application()
    timeout = ClientTimeout(total=600)

    async def completions(request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return web.json_response({"error": "the body must be JSON"}, status=400)
        prefill = {**body, "max_tokens": 1, "stream": False}
        prefill.pop("stream_options", None)
        async with ClientSession(timeout=timeout) as session:
            async with session.post(prefill_url + "/v1/completions", json=prefill) as reply:
                if reply.status != 200:
                    log.warning("prefill instance answered %s", reply.status)
                await reply.read()
            async with session.post(decode_url + "/v1/completions", json=body) as reply:
                response = web.StreamResponse(
                    status=reply.status,
                    headers={"Content-Type": reply.headers.get("Content-Type", "")},
                )
                await response.prepare(request)
                async for chunk in reply.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                return response

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/health", health)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--prefill", required=True, help="URL of the kv_producer instance")
    parser.add_argument("--decode", required=True, help="URL of the kv_consumer instance")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    web.run_app(
        build_app(args.prefill.rstrip("/"), args.decode.rstrip("/")),
        host=args.host,
        port=args.port,
        print=None,
    )


if __name__ == "__main__":
    main()
