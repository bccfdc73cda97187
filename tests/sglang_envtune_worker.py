"""``sglang.launch_server``'s command line, served by ``envtune-serve`` (router tests on CPU, no SGLang).

The launcher starts ``<engine.launch.python> -m sglang.launch_server --model-path M --host H --port P
... --config admin.yaml``; ``test_sglang_router.py`` points ``engine.launch.python`` at a wrapper that
runs this script instead. It parses the flags as SGLang 0.5.23 spells them (an unknown flag fails, as
in SGLang), passes the admin key from the ``--config`` YAML to envtune-serve through the environment
variable it reads (``ENVTUNE_ADMIN_API_KEY``; never on a command line), and execs envtune-serve on
that model, host and port: a real SGLang-protocol server (``/generate``, adapters, ``/server_info``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sglang_standin_worker import parse  # the tests folder is not a package: found on the path above


def main() -> None:
    args = parse(sys.argv[1:])
    env = dict(os.environ)
    if args.config:
        for line in Path(args.config).read_text(encoding="utf-8").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "admin_api_key":
                env["ENVTUNE_ADMIN_API_KEY"] = json.loads(value.strip())
    argv = [
        sys.executable, "-m", "envtune.runtime.cli.serve", "--model", args.model_path,
        "--port", str(args.port), "--set", f"server.host={args.host}", "--set", "engine.max_batch_rows=4",
    ]  # fmt: skip
    env.setdefault("OMP_NUM_THREADS", "1")
    os.execve(sys.executable, argv, env)


if __name__ == "__main__":
    main()
