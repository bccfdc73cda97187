"""A stand-in for ``python -m sglang.launch_server`` in launcher tests (CPU, no SGLang).

Parses the flags the launcher passes exactly as SGLang 0.5.23 spells them (unknown flags are an
error, as in SGLang), reads ``admin_api_key`` from the ``--config`` YAML file, and serves:
``/health`` (503 for ``STANDIN_STARTUP_S`` seconds, then 200), ``/load_lora_adapter`` (admin key
required once one is set, as SGLang's ADMIN_OPTIONAL level does), and ``/standin`` (what it was
started with: argv, ``CUDA_VISIBLE_DEVICES``). ``STANDIN_EXIT_AFTER_S`` makes it exit with code 3
after that many seconds (a worker dying). It writes nothing else.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

from aiohttp import web


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sglang-standin")
    p.add_argument("--model-path", required=True)
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--tp-size", type=int, default=1)
    p.add_argument("--enable-lora", action="store_true")
    p.add_argument("--max-lora-rank", type=int)
    p.add_argument("--lora-target-modules", nargs="*")
    p.add_argument("--max-loras-per-batch", type=int)
    p.add_argument("--max-loaded-loras", type=int)
    p.add_argument("--mem-fraction-static", type=float)
    p.add_argument("--config")
    return p.parse_args(argv)


def read_config(path: str | None) -> dict[str, str]:
    if path is None:
        return {}
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key.strip()] = json.loads(value.strip())  # the launcher writes JSON strings (valid YAML)
    return out


async def main() -> None:
    args = parse(sys.argv[1:])
    admin_key = read_config(args.config).get("admin_api_key")
    started = time.monotonic()
    startup_s = float(os.environ.get("STANDIN_STARTUP_S", "0.5"))
    exit_after = os.environ.get("STANDIN_EXIT_AFTER_S")

    async def health(request: web.Request) -> web.Response:
        return web.Response(status=200 if time.monotonic() - started >= startup_s else 503)

    async def load(request: web.Request) -> web.Response:
        if admin_key and request.headers.get("Authorization") != f"Bearer {admin_key}":
            return web.json_response({"error": "unauthorized"}, status=401)
        body = await request.json()
        return web.json_response(
            {"success": True, "error_message": "", "loaded_adapters": [body["lora_name"]]}
        )

    async def standin(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "argv": sys.argv[1:],
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "admin_key_set": bool(admin_key),
                "virtual_env": os.environ.get("VIRTUAL_ENV"),
            }
        )

    app = web.Application()
    app.add_routes(
        [web.get("/health", health), web.post("/load_lora_adapter", load), web.get("/standin", standin)]
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port).start()
    print(f"standin listening on {args.host}:{args.port}", flush=True)
    if exit_after is not None:
        await asyncio.sleep(float(exit_after))
        print("standin: simulated crash", flush=True)
        os._exit(3)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
