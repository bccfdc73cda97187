"""``envtune-export RUN [--merge] [--out DIR]``: a run's final adapter as a peft folder or a merged model.

Thin: parsing and messages only; the work is ``envtune.runtime.recipe.export.export_run``. Prints the
output folder on stdout (so scripts can use it) and a one-line summary on stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def build_arg_parser() -> argparse.ArgumentParser:
    """``envtune-export``'s command line."""
    parser = argparse.ArgumentParser(
        prog="envtune-export",
        description=(
            "Export a run's result: the adapter of its last complete checkpoint, as a peft folder "
            "(default) or merged into the base model as a transformers folder (--merge)."
        ),
    )
    parser.add_argument("run", type=Path, help="the run folder (runs/<timestamp>-<name>)")
    parser.add_argument(
        "--merge", action="store_true", help="merge the adapter into the base model (a full model folder)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default: RUN/export/{adapter,merged}-step-N)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``envtune-export``."""
    from envtune.runtime.recipe.export import ExportError, export_run

    parser = build_arg_parser()
    args = parser.parse_args(argv)
    try:
        result = export_run(args.run, args.out, merge=args.merge, overwrite=args.overwrite)
    except ExportError as exc:
        parser.exit(2, f"envtune-export: error: {exc}\n")
    kind = "merged model" if result.merged else "peft adapter"
    version = f", policy version {result.policy_version}" if result.policy_version is not None else ""
    print(
        f"exported the {kind} of checkpoint step {result.step}{version} (base: {result.base_model})",
        file=sys.stderr,
    )
    print(result.out)


if __name__ == "__main__":  # pragma: no cover
    main()
