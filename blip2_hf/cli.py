"""`blip2-hf`: the package's command line, one subcommand per task.

    blip2-hf push FOLDER REPO_ID [--results results.json ...] [--private] [--license mit] [--dataset ID ...]
    blip2-hf card FOLDER REPO_ID [--results results.json ...] [--output README.md]

The token comes from `HF_TOKEN` or `hf auth login`, never from the command line (where shell history and `ps` would
keep it). Adding a subcommand: write `add_<name>_command(subparsers)`, which registers its parser and sets `func` (a
function of the parsed arguments returning the exit code), and call it in `build_parser`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from .hub import DEFAULT_LICENSE, DEFAULT_TEMPLATE, PushError, build_model_card, push_folder


def _add_card_arguments(parser: argparse.ArgumentParser) -> None:
    """What the model card is built from, shared by `push` and `card`."""
    parser.add_argument("folder", type=Path, help="A save_pretrained folder (model, processor, tokenizers).")
    parser.add_argument("repo_id", help="The Hub repo, namespace/name.")
    parser.add_argument(
        "--results",
        nargs="+",
        action="extend",
        default=[],
        metavar="RESULTS_JSON",
        help="results.json files of evaluation/vqa.py, caption.py, retrieval.py (or their output folders): the "
        "card's model-index. None: no evaluation results on the card.",
    )
    parser.add_argument("--license", default=DEFAULT_LICENSE, help=f"Hub license id (default: {DEFAULT_LICENSE}).")
    parser.add_argument(
        "--dataset", dest="datasets", action="append", default=[], metavar="ID", help="Training dataset (repeat)."
    )
    parser.add_argument(
        "--base-model",
        dest="base_models",
        action="append",
        default=[],
        metavar="ID",
        help="Base model Hub id (repeat), added to those config.json records (e.g. the LLM).",
    )
    parser.add_argument("--tag", dest="tags", action="append", default=[], metavar="TAG", help="Extra tag (repeat).")
    parser.add_argument(
        "--template",
        type=Path,
        default=None,
        help=f"Jinja2 card template (default: the shipped {DEFAULT_TEMPLATE.name}).",
    )


def add_push_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "push",
        help="Publish a trained folder to the Hub in one commit, with a generated model card.",
        description="Create REPO_ID (if needed) and publish FOLDER in one commit: safetensors weights, config.json "
        "with the complete auto_map, the remote code, processor and tokenizers, and a README.md model card. Log in "
        "first: `hf auth login` or HF_TOKEN=hf_...",
    )
    _add_card_arguments(parser)
    parser.add_argument("--private", action="store_true", help="Create the repo private (if it does not exist).")
    parser.add_argument("--commit-message", default=None)
    parser.add_argument("--revision", default=None, help="Branch to commit to (default: main).")
    parser.add_argument(
        "--allow-pickle", action="store_true", help="Publish pickled files (.bin, .pt, ...) too; refused by default."
    )
    parser.set_defaults(func=run_push)


def run_push(args: argparse.Namespace) -> int:
    url = push_folder(
        args.folder,
        args.repo_id,
        private=True if args.private else None,
        commit_message=args.commit_message,
        results=args.results,
        license=args.license,
        datasets=args.datasets,
        base_models=args.base_models,
        tags=args.tags,
        template_path=args.template,
        allow_pickle=args.allow_pickle,
        revision=args.revision,
    )
    print(url)
    return 0


def add_card_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "card",
        help="Write the model card `push` would publish, without touching the Hub.",
        description="Render the model card of FOLDER as REPO_ID would show it.",
    )
    _add_card_arguments(parser)
    parser.add_argument("--output", "-o", type=Path, default=None, help="Write here (default: print it).")
    parser.set_defaults(func=run_card)


def run_card(args: argparse.Namespace) -> int:
    card = build_model_card(
        args.folder,
        args.repo_id,
        args.results,
        license=args.license,
        datasets=args.datasets,
        base_models=args.base_models,
        tags=args.tags,
        template_path=args.template,
    )
    if args.output is None:
        print(card)
    else:
        args.output.write_text(str(card), encoding="utf-8")
        print(f"Wrote {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blip2-hf", description="BLIP-2 on the Hugging Face stack.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_push_command(subparsers)
    add_card_command(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The package's progress messages on stderr; the libraries' own loggers keep their settings.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    package_logger = logging.getLogger("blip2_hf")
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO)
    try:
        return args.func(args)
    except (PushError, FileNotFoundError, ValueError) as err:
        print(f"blip2-hf {args.command}: error: {err}", file=sys.stderr)
        return 1
    finally:
        package_logger.removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
