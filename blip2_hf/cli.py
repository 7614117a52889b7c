"""`blip2-hf`: the package's command line, one subcommand per task.

    blip2-hf demo [--quick] [--seeds N] [--output DIR]
    blip2-hf push FOLDER REPO_ID [--results results.json ...] [--private] [--license mit] [--dataset ID ...]
    blip2-hf push LORA_FOLDER REPO_ID (--merge-lora | --base-model BASE_REPO_ID [--push-base])
    blip2-hf card FOLDER REPO_ID [--results results.json ...] [--output README.md]
    blip2-hf caption IMAGE_DIR_OR_GLOB [...] [--output captions.jsonl] [--model M] [--prompt TEXT] [--num-beams 3]
    blip2-hf ask IMAGE [IMAGE ...] QUESTION [--model M] [--prompt-template "Question: {} Short answer:"]
    blip2-hf ask --questions FILE [--output answers.jsonl] [--model M]
    blip2-hf retrieve --images DIR --text TEXT [--model M] [--top-k 5] [--rerank-k 16]

`push` / `card`: the token comes from `HF_TOKEN` or `hf auth login`, never from the command line (where shell history
and `ps` would keep it).

`caption` / `ask` / `retrieve` load `--model` (a folder or a Hub id); without it, the checkpoints that `blip2-hf demo`
leaves in its demo dir (see `blip2_hf.demo`). Their exit codes: 0 done; 1 some inputs failed (each named on stderr, the
others still processed); 2 nothing could run (no model, no readable image, unusable arguments).

Adding a subcommand: write `add_<name>_command(subparsers)`, which registers its parser and sets `func` (a function of
the parsed arguments returning the exit code), and call it in `build_parser`. Import torch, transformers and the models
inside the command functions, not at the top: the console script (`blip2_hf_launch`) parses the arguments before the
package's `__init__` runs, so `blip2-hf --help` answers without torch (tests/test_cli.py checks that).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Only light modules at the top: the parsers (and `--help`) must not wait for torch and transformers.
from .batch_inference import DTYPES, IMAGE_EXTENSIONS, resolve_dtype
from .constants import DEFAULT_LICENSE, DEFAULT_TEMPLATE, HUB_TIMEOUT, VQA_PROMPT
from .demo import CAPTION_MODEL_SUBDIR, RETRIEVAL_MODEL_SUBDIR, demo_dir

if TYPE_CHECKING:  # for the annotations only: the commands import these when they run
    import torch
    from PIL import Image
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from .processing_blip2 import Blip2Processor


def push_folder(*args: Any, **kwargs: Any) -> str:
    """`blip2_hf.hub.push_folder`, imported when called (`hub` imports transformers)."""
    from .hub import push_folder as push

    return push(*args, **kwargs)


def build_model_card(*args: Any, **kwargs: Any) -> Any:
    """`blip2_hf.hub.build_model_card`, imported when called (`hub` imports transformers)."""
    from .hub import build_model_card as build

    return build(*args, **kwargs)


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
        help="Base model Hub id (repeat), added to those config.json records (e.g. the LLM). For a LoRA folder "
        "published as an adapter: the one Hub repo holding its base model (see --push-base), written as the "
        "adapter's base_model_name_or_path.",
    )
    parser.add_argument(
        "--merge-lora",
        action="store_true",
        help="LoRA folder: merge the adapter into the weights (peft) and publish a plain full checkpoint.",
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
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        metavar="SECONDS",
        default=HUB_TIMEOUT,
        help="Seconds each Hub request may wait to connect and for each read or write before the push fails "
        f"(default: {HUB_TIMEOUT:g}; a slow upload that keeps moving is not cut).",
    )
    parser.add_argument(
        "--push-base",
        action="store_true",
        help="LoRA folder published as an adapter: first publish its base model (trained Q-Former, LLM without the "
        "adapter) to the --base-model repo. Without it that repo must already hold exactly these base weights.",
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
        merge_lora=args.merge_lora,
        push_base=args.push_base,
        timeout=args.timeout,
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
    from .hub import lora_base_repo, read_adapter_config

    # A LoRA folder's card is the adapter repo's (its base on the Hub) unless it is published merged.
    lora = read_adapter_config(args.folder) is not None and not args.merge_lora
    card = build_model_card(
        args.folder,
        args.repo_id,
        args.results,
        license=args.license,
        datasets=args.datasets,
        base_models=args.base_models,
        tags=args.tags,
        template_path=args.template,
        adapter_base=lora_base_repo(args.folder, args.base_models) if lora else None,
    )
    if args.output is None:
        print(card)
    else:
        args.output.write_text(str(card), encoding="utf-8")
        print(f"Wrote {args.output}")
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# Inference: caption, ask, retrieve
# ---------------------------------------------------------------------------------------------------------------------

# Shown when there is no default model: a Hub checkpoint each command can load instead.
CAPTION_MODEL_EXAMPLE = "Salesforce/blip2-opt-2.7b"
RETRIEVAL_MODEL_EXAMPLE = "Salesforce/blip2-itm-vit-g"
# LAVIS's Q-Former text length for retrieval (`compute_sim_matrix`, `max_length=35`), as evaluation/retrieval.py.
RETRIEVAL_TEXT_MAX_LENGTH = 35


def _positive_int(text: str) -> int:
    """argparse type: an int >= 1 (0 beams or 0 new tokens would fail deep inside `generate`)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    """argparse type: a number > 0 (a timeout of 0 would fail every request)."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def _add_model_arguments(parser: argparse.ArgumentParser, default: str, example: str) -> None:
    """`--model` and `--device`, shared by `caption`, `ask` and `retrieve`."""
    parser.add_argument(
        "--model",
        default=None,
        metavar="NAME_OR_PATH",
        help=f"A from_pretrained folder or Hub id (e.g. {example}). Default: {default} (what `blip2-hf demo` "
        "trains; the demo dir is $BLIP2_HF_DEMO_DIR, else ./blip2_demo).",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="Where the model runs; auto: cuda if available, else cpu (default: auto).",
    )


def _model_name(args: argparse.Namespace, subdir: str, example: str) -> str | None:
    """`--model`, else the demo checkpoint `<demo dir>/<subdir>`; None (after saying why on stderr) when that is
    missing, so the user learns how to make it rather than reading a Hub "repository not found" error."""
    if args.model is not None:
        if not Path(args.model).exists() and not _looks_like_hub_id(args.model):
            print(
                f"blip2-hf {args.command}: error: --model {args.model}: no such folder (and not a Hub id, which is "
                "NAME or NAMESPACE/NAME).",
                file=sys.stderr,
            )
            return None
        return args.model
    folder = demo_dir() / subdir
    if folder.is_dir():
        return str(folder)
    print(
        f"blip2-hf {args.command}: error: no --model given and the default model {folder} does not exist. Run "
        "`blip2-hf demo` first (it trains this checkpoint on CPU in a few minutes; set BLIP2_HF_DEMO_DIR if it lives "
        f"elsewhere) or pass --model NAME_OR_PATH, e.g. --model {example}",
        file=sys.stderr,
    )
    return None


def _looks_like_hub_id(name: str) -> bool:
    """Whether `name` could be a Hub repo id (`NAME` or `NAMESPACE/NAME`), as `huggingface_hub` validates them: a path
    such as `./runs/model`, `/abs/model` or `a/b/c` cannot be, so a missing one is a missing folder, not a Hub id."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return not name.startswith((".", "~"))


def _device(args: argparse.Namespace) -> torch.device | None:
    """`--device` as a `torch.device`; None (after an error on stderr) for cuda without a GPU."""
    import torch

    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"blip2-hf {args.command}: error: --device cuda, but CUDA is not available here.", file=sys.stderr)
        return None
    return torch.device(args.device)


def _load_model(
    args: argparse.Namespace, model_class: type[PreTrainedModel], subdir: str, example: str
) -> tuple[PreTrainedModel, Blip2Processor, torch.device] | None:
    """`(model, processor, device)`: `--model` (else the demo checkpoint `subdir`) loaded, the model in eval mode on
    `--device`. None, after a one-line error on stderr, when there is no such model (a missing folder, a Hub id that
    does not resolve, files missing, a truncated weight file, tensors missing, unexpected or of another shape: the
    strict `from_pretrained` names them) or no such device."""
    from . import Blip2Processor
    from .modeling_blip2 import CheckpointMismatchError

    name = _model_name(args, subdir, example)
    device = _device(args) if name is not None else None
    if device is None:
        return None
    try:
        model = model_class.from_pretrained(name)
        processor = Blip2Processor.from_pretrained(name)
    except (CheckpointMismatchError, OSError, ValueError) as err:  # a truncated weight file is an OSError
        where = "" if Path(name).exists() else " (no such folder here, so it was looked up as a Hub id)"
        message = str(err) if str(err).startswith(f"{name}:") else f"{name}{where}: {err}"
        print(f"blip2-hf {args.command}: error: cannot load {message}", file=sys.stderr)
        return None
    return model.to(device).eval(), processor, device


def _progress(**kwargs: Any) -> Any:
    """A tqdm bar on stderr (stdout keeps the results), shown when stderr is a terminal: for people, not for logs."""
    from tqdm.auto import tqdm

    return tqdm(file=sys.stderr, disable=not sys.stderr.isatty(), dynamic_ncols=True, **kwargs)


def _read_image(path: Path, command: str) -> Image.Image | None:
    """The image at `path` as RGB (`blip2_hf.load_image`, the pipeline's and training's rules), or None after naming
    the file and the error on stderr."""
    from .processing_blip2 import load_image

    try:
        return load_image(path)
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ... for broken files
        print(f"blip2-hf {command}: cannot read {path}: {type(err).__name__}: {err}", file=sys.stderr)
        return None


def _one_line(text: str) -> str:
    """`text` with its tabs and line breaks as spaces: `PATH<TAB>caption` stays one line whatever the LLM emits."""
    return " ".join(text.replace("\t", " ").splitlines())


def _add_streaming_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """`--output`, `--retry-errors`, `--num-workers`, `--dtype`: shared by `caption` and `ask`."""
    parser.add_argument(
        "--output",
        "-o",
        type=Path,
        default=None,
        metavar="FILE.jsonl",
        help=f"Append one JSON line per {what} to FILE as each batch finishes. A rerun with the same FILE skips what it "
        "holds (a line cut by a kill is dropped and redone), so an interrupted run resumes. Unreadable images are "
        'recorded as {"image": ..., "error": ...} lines and not retried unless --retry-errors.',
    )
    parser.add_argument(
        "--retry-errors",
        action="store_true",
        help="With --output: remove the error lines from FILE and try those images again.",
    )
    parser.add_argument(
        "--num-workers",
        type=_non_negative_int,
        metavar="N",
        default=None,
        help="DataLoader worker processes that read and preprocess images while the model generates (0: in the main "
        "process). Default: on a GPU half the CPU cores (1 to 8); on CPU 0 below 8 cores (the model's threads use "
        "them all), else a quarter of them.",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="Model weights' dtype; auto: bfloat16 on a GPU (float16 if it lacks bf16), float32 on CPU. float16 "
        "needs a GPU (default: auto).",
    )


def _non_negative_int(text: str) -> int:
    """argparse type: an int >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def add_caption_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "caption",
        help="Caption images, folders or glob patterns with a BLIP-2 model (`PATH<TAB>caption` lines, or JSON Lines "
        "with --output).",
        description="Caption each image (optionally continuing --prompt) by beam search (--num-beams) with a "
        "Blip2ForConditionalGeneration: the generated text only, never the prompt. A folder gives its images "
        f"recursively ({', '.join(ext[1:] for ext in IMAGE_EXTENSIONS)}, any case, sorted); a quoted pattern "
        "('photos/**/*.jpg') its sorted matches. Images stream through DataLoader workers (--num-workers) in batches "
        "(--batch-size). Without --output, `PATH<TAB>caption` lines on stdout, in order; with --output FILE.jsonl, "
        '{"image": PATH, "caption": TEXT} lines appended per batch, resumable. Unreadable images are named on stderr '
        "(exit code 1 at the end). Other generation settings come from the checkpoint's generation_config.",
    )
    parser.add_argument(
        "images", nargs="+", metavar="IMAGE", help="Image files, folders (recursive) or glob patterns (quoted)."
    )
    parser.add_argument(
        "--prompt", default="", metavar="TEXT", help="Text the caption continues, e.g. 'a photo of' (default: none)."
    )
    parser.add_argument("--num-beams", type=_positive_int, metavar="N", default=3, help="Beam width (default: 3).")
    parser.add_argument(
        "--max-new-tokens", type=_positive_int, metavar="N", default=30, help="Caption length limit (default: 30)."
    )
    parser.add_argument(
        "--batch-size", type=_positive_int, metavar="N", default=16, help="Images per generate call (default: 16)."
    )
    _add_streaming_arguments(parser, "image")
    _add_model_arguments(parser, f"<demo dir>/{CAPTION_MODEL_SUBDIR}", CAPTION_MODEL_EXAMPLE)
    parser.set_defaults(func=run_caption)


def _load_generation_model(args: argparse.Namespace) -> tuple[PreTrainedModel, Blip2Processor] | None:
    """`--model` on `--device` in `--dtype`, eval mode; None after an error on stderr."""
    from . import Blip2ForConditionalGeneration

    loaded = _load_model(args, Blip2ForConditionalGeneration, CAPTION_MODEL_SUBDIR, CAPTION_MODEL_EXAMPLE)
    if loaded is None:
        return None
    model, processor, device = loaded
    try:
        dtype = resolve_dtype(args.dtype, device)
    except ValueError as err:
        print(f"blip2-hf {args.command}: error: {err}", file=sys.stderr)
        return None
    return model.to(dtype), processor


def _open_results(args: argparse.Namespace, key_of: Callable, required: tuple[str, ...]) -> Any:
    """The `--output` `ResultsFile` (after saying on stderr what a rerun found there); None if no --output; False after
    an error on stderr (not a results file)."""
    from .batch_inference import ResultsFile

    if args.output is None:
        return None
    try:
        results = ResultsFile(args.output, key_of, required, retry_errors=args.retry_errors)
    except (ValueError, UnicodeDecodeError) as err:
        print(f"blip2-hf {args.command}: error: {err}", file=sys.stderr)
        return False
    if results.dropped_partial:
        print(
            f"blip2-hf {args.command}: {args.output}: dropped its last line, cut by a kill; redoing it.",
            file=sys.stderr,
        )
    if results.retried:
        print(
            f"blip2-hf {args.command}: {args.output}: removed {results.retried} error lines to retry them.",
            file=sys.stderr,
        )
    return results


def _stream(args: argparse.Namespace, total: int, unit: str, batches: Iterator[list[dict]], handle: Callable) -> int:
    """Run `batches` under a progress bar (`unit`s/s), handing each batch's records to `handle`; returns how many
    records were errors (each named on stderr)."""
    import torch

    failed = 0
    named: set[str] = set()  # an unreadable image with several questions is named once
    with torch.inference_mode(), _progress(total=total, unit=unit, desc=args.command) as bar:
        for records in batches:
            for record in records:
                if "error" in record:
                    failed += 1
                    if record["image"] in named:
                        continue
                    named.add(record["image"])
                    bar.write(
                        f"blip2-hf {args.command}: cannot read {record['image']}: {record['error']}", file=sys.stderr
                    )
            handle(records)
            bar.update(len(records))
    return failed


def _finish(args: argparse.Namespace, results: Any, failed: int, total: int, what: str) -> int:
    """The closing summary on stderr and the exit code: 1 if this run had errors or, with --output, the file holds
    error lines (from this run or an earlier one), else 0."""
    if results is None:
        if failed:
            print(f"blip2-hf {args.command}: {failed} of {total} {what} could not be read.", file=sys.stderr)
        return 1 if failed else 0
    results.close()
    print(f"blip2-hf {args.command}: {args.output}: {total - failed} written, {failed} errors this run; "
          f"{len(results.done)} done in all.", file=sys.stderr)  # fmt: skip
    if results.errors:
        print(
            f"blip2-hf {args.command}: {args.output} holds {len(results.errors)} error lines (unreadable images, "
            "named above or in the file); --retry-errors tries them again.",
            file=sys.stderr,
        )
    return 1 if failed or results.errors else 0


def _expand(args: argparse.Namespace) -> list[Path] | None:
    """`args.images` expanded (`expand_image_sources`); an empty folder or a pattern matching nothing is named on
    stderr and counted in `args.empty_sources` (exit code 1 at the end); None (after an error) if nothing is left."""
    from .batch_inference import expand_image_sources

    problems: list[str] = []
    paths = expand_image_sources(args.images, unique=args.output is not None, problems=problems)
    for problem in problems:
        print(f"blip2-hf {args.command}: {problem}", file=sys.stderr)
    args.empty_sources = len(problems)
    if not paths:
        print(f"blip2-hf {args.command}: error: no image files to read.", file=sys.stderr)
        return None
    return paths


def _skipping(args: argparse.Namespace, skipped: int, what: str) -> None:
    if skipped:
        print(f"blip2-hf {args.command}: skipping {skipped} {what} already in {args.output}.", file=sys.stderr)


def run_caption(args: argparse.Namespace) -> int:
    """Caption `args.images` to stdout or `--output`; 1 if any image could not be read, 2 if nothing could run."""
    from .batch_inference import caption_images, caption_key, default_num_workers, image_key

    paths = _expand(args)
    if paths is None:
        return 2
    results = _open_results(args, caption_key, ("image",))
    loaded = _load_generation_model(args) if results is not False else None
    if loaded is None:
        return 2
    model, processor = loaded
    if results is not None:
        todo = [path for path in paths if image_key(path) not in results.done]
        _skipping(args, len(paths) - len(todo), "images")
        paths = todo

    def handle(records: list[dict]) -> None:
        if results is not None:
            results.append(records)
            return
        for record in records:
            if "caption" in record:
                _print_line(record["image"], _one_line(record["caption"]))
        sys.stdout.flush()  # each batch's lines as soon as they exist (long runs, pipes)

    workers = default_num_workers(model.device) if args.num_workers is None else args.num_workers
    batches = caption_images(model, processor, paths, args.prompt, args.batch_size, workers,
                             num_beams=args.num_beams, max_new_tokens=args.max_new_tokens)  # fmt: skip
    failed = _stream(args, len(paths), "image", batches, handle)
    return max(_finish(args, results, failed, len(paths), "images"), 1 if args.empty_sources else 0)


def _print_line(path: Path | str, text: str) -> None:
    """`PATH<TAB>text` on stdout, clear of a progress bar on stderr (tqdm redraws it below)."""
    from tqdm.auto import tqdm

    tqdm.write(f"{path}\t{text}", file=sys.stdout)


class _ImagesThenQuestion(argparse.Action):
    """`ask IMAGE [IMAGE ...] QUESTION`: the positionals, split into `images` (all but the last) and `question`."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option=None
    ) -> None:
        values = list(values or [])
        namespace.images = [Path(value) for value in values[:-1]]
        namespace.question = values[-1] if values else None


def add_ask_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ask",
        help="Answer questions about images (zero-shot VQA, as BLIP-2 is evaluated).",
        usage="blip2-hf ask IMAGE [IMAGE ...] QUESTION [options]\n       blip2-hf ask --questions FILE [--output "
        "FILE.jsonl] [options]",
        description="Zero-shot VQA as LAVIS's `predict_answers`: the question goes into --prompt-template, the model "
        "generates by beam search, and the answer (the generated text only) is printed: alone for one IMAGE, as "
        "`PATH<TAB>answer` lines (in order) for several. With --questions FILE (JSON Lines or a JSON list of "
        '{"image": PATH, "question": TEXT, "question_id": optional}), the questions are grouped by image (each image '
        "read once, in order of first appearance) and answered as JSON lines, on stdout or appended to --output "
        "(resumable; keyed by question_id, else by image and question). Unreadable images are named on stderr and "
        "skipped (exit code 1 at the end).",
    )
    parser.add_argument(
        "positionals", nargs="*", action=_ImagesThenQuestion, metavar="IMAGE... QUESTION",
        help="Image file(s) (or folders, glob patterns), then the question, e.g. 'what color is the circle?'.",
    )  # fmt: skip
    parser.set_defaults(images=[], question=None)
    parser.add_argument("--questions", type=Path, default=None, metavar="FILE", help="A questions file (see above).")
    parser.add_argument(
        "--image-root",
        type=Path,
        default=None,
        metavar="DIR",
        help="Where the questions file's relative image paths start (default: the questions file's folder).",
    )
    parser.add_argument(
        "--prompt-template",
        default=VQA_PROMPT,
        metavar="TEMPLATE",
        help=f"The prompt, with {{}} where the question goes (default: {VQA_PROMPT!r}, as evaluation/vqa.py).",
    )
    parser.add_argument(
        "--chat-template",
        action="store_true",
        help="Put the filled-in prompt into the LLM tokenizer's chat template as a user turn (chat / instruct LLMs; "
        "default: the plain prompt).",
    )
    parser.add_argument("--num-beams", type=_positive_int, metavar="N", default=5, help="Beam width (default: 5).")
    parser.add_argument(
        "--max-new-tokens", type=_positive_int, metavar="N", default=10, help="Answer length limit (default: 10)."
    )
    parser.add_argument(
        "--batch-size",
        type=_positive_int,
        metavar="N",
        default=16,
        help="Questions per generate call, whole images' questions together (default: 16).",
    )
    _add_streaming_arguments(parser, "question")
    _add_model_arguments(parser, f"<demo dir>/{CAPTION_MODEL_SUBDIR}", CAPTION_MODEL_EXAMPLE)
    parser.set_defaults(func=run_ask)


def _ask_questions(args: argparse.Namespace) -> list | None:
    """The `Question`s to answer: the --questions file's, or each IMAGE with QUESTION; None after an error."""
    from .batch_inference import Question, read_questions

    try:
        if args.questions is not None:
            if args.question is not None:
                raise ValueError("give either IMAGE... QUESTION or --questions FILE, not both.")
            return read_questions(args.questions, args.image_root)
        if not args.images:
            raise ValueError("give IMAGE [IMAGE ...] QUESTION, or --questions FILE.")
        paths = _expand(args)
        return None if paths is None else [Question(str(path), path, args.question) for path in paths]
    except (OSError, ValueError) as err:
        print(f"blip2-hf ask: error: {err}", file=sys.stderr)
        return None


def run_ask(args: argparse.Namespace) -> int:
    """Print or write the answers; 1 if an image cannot be read, 2 if nothing could run."""
    import json

    from .batch_inference import answer_key, answer_question_records, default_num_workers

    try:  # LAVIS formats its prompt with `str.format`; a template without {} would silently drop the question
        if "{}" not in args.prompt_template:
            raise ValueError("it has no {}")
        args.prompt_template.format("")
    except (IndexError, KeyError, ValueError) as err:
        print(f"blip2-hf ask: error: unusable --prompt-template {args.prompt_template!r}: {err}", file=sys.stderr)
        return 2
    questions = _ask_questions(args)
    results = _open_results(args, answer_key, ("image", "question")) if questions is not None else False
    loaded = _load_generation_model(args) if results is not False else None
    if loaded is None:
        return 2
    model, processor = loaded
    if args.chat_template:
        try:
            processor.chat_prompt("")
        except ValueError as err:
            print(f"blip2-hf ask: error: --chat-template: {err}", file=sys.stderr)
            return 2
    if results is not None:
        todo = [question for question in questions if question.key() not in results.done]
        _skipping(args, len(questions) - len(todo), "questions")
        questions = todo
    from tqdm.auto import tqdm

    single = len(questions) == 1

    def handle(records: list[dict]) -> None:
        if results is not None:
            results.append(records)
            return
        for record in records:
            if args.questions is not None:
                tqdm.write(json.dumps(record, ensure_ascii=False), file=sys.stdout)
            elif "answer" in record and single:  # one image: the answer alone, as before JSON lines existed
                tqdm.write(_one_line(record["answer"]), file=sys.stdout)
            elif "answer" in record:
                _print_line(record["image"], _one_line(record["answer"]))
        sys.stdout.flush()

    workers = default_num_workers(model.device) if args.num_workers is None else args.num_workers
    # min_new_tokens=1 is LAVIS's `min_len=1`: an end-of-answer ("\n" or EOS) cannot come first, so a model unsure
    # of the answer still gives one instead of an empty line
    batches = answer_question_records(model, processor, questions, args.prompt_template, args.batch_size, workers,
                                      use_chat_template=args.chat_template, num_beams=args.num_beams,
                                      max_new_tokens=args.max_new_tokens, min_new_tokens=1)  # fmt: skip
    failed = _stream(args, len(questions), "question", batches, handle)
    what = "questions (their images)" if args.questions is not None else "images"
    code = _finish(args, results, failed, len(questions), what)
    return max(code, 1 if getattr(args, "empty_sources", 0) else 0)


def add_retrieve_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "retrieve",
        help="Rank the images of a folder against a text (ITC, then ITM re-ranking).",
        description="Score every image of DIR against TEXT as BLIP-2 retrieval does (blip2_hf.retrieval, LAVIS "
        "`compute_sim_matrix`): ITC similarity for all, then the ITC top --rerank-k re-ranked by ITM. Prints the "
        "top --top-k as `RANK<TAB>SCORE<TAB>PATH` lines, best first. SCORE is the re-ranked score the order follows: "
        "the ITM head's raw 'match' logit plus the ITC cosine (max over the queries), unbounded, comparable only "
        "within one run. TEXT is cleaned as LAVIS does (lowercase, punctuation dropped) and cut to "
        f"{RETRIEVAL_TEXT_MAX_LENGTH} Q-Former tokens. Unreadable images are named on stderr and skipped.",
    )
    parser.add_argument(
        "--images",
        required=True,
        type=Path,
        metavar="DIR",
        help=f"Folder of images ({', '.join(ext[1:] for ext in IMAGE_EXTENSIONS)}, any case; not recursive).",
    )
    parser.add_argument("--text", required=True, help="The query text.")
    parser.add_argument("--top-k", type=_positive_int, metavar="N", default=5, help="Images printed (default: 5).")
    parser.add_argument(
        "--rerank-k",
        type=_positive_int,
        metavar="N",
        default=16,
        help="ITC candidates re-ranked by ITM (default: 16; raised to --top-k so every printed score is re-ranked).",
    )
    parser.add_argument(
        "--batch-size",
        type=_positive_int,
        metavar="N",
        default=16,
        help="Images per encoding pass and pairs per ITM pass (16).",
    )
    _add_model_arguments(parser, f"<demo dir>/{RETRIEVAL_MODEL_SUBDIR}", RETRIEVAL_MODEL_EXAMPLE)
    parser.set_defaults(func=run_retrieve)


def _qformer_tokenizer(processor: Blip2Processor) -> PreTrainedTokenizerBase | None:
    """The Q-Former (BERT) tokenizer: the processor's `qformer_tokenizer`, else its tokenizer when that is BERT-like
    (transformers' Salesforce/blip2-itm-vit-g ships its BERT tokenizer as the processor's only tokenizer, as
    evaluation/retrieval.py also accepts)."""
    if getattr(processor, "qformer_tokenizer", None) is not None:
        return processor.qformer_tokenizer
    if getattr(processor.tokenizer, "cls_token", None) is not None:
        return processor.tokenizer
    return None


def run_retrieve(args: argparse.Namespace) -> int:
    """Print the top `--top-k` images; 2 if no model, no Q-Former tokenizer or no readable image."""
    import torch

    from . import Blip2ForImageTextRetrieval
    from .data import pre_caption
    from .retrieval import ImageIndex, encode_images, encode_texts, itc_similarity, itm_rerank

    if not args.images.is_dir():
        print(
            f"blip2-hf retrieve: error: --images {args.images} is not a folder (or does not exist).", file=sys.stderr
        )
        return 2
    paths = sorted(
        (path for path in args.images.iterdir() if path.suffix.lower() in IMAGE_EXTENSIONS and not path.is_dir()),
        key=lambda path: path.name,
    )
    if not paths:
        print(
            f"blip2-hf retrieve: error: {args.images} holds no image files ({', '.join(IMAGE_EXTENSIONS)}).",
            file=sys.stderr,
        )
        return 2
    loaded = _load_model(args, Blip2ForImageTextRetrieval, RETRIEVAL_MODEL_SUBDIR, RETRIEVAL_MODEL_EXAMPLE)
    if loaded is None:
        return 2
    model, processor, device = loaded
    tokenizer = _qformer_tokenizer(processor)
    if tokenizer is None:
        print(
            "blip2-hf retrieve: error: the model's processor has no Q-Former tokenizer (no qformer_tokenizer/ "
            "subfolder, as stage-1 folders have, and its tokenizer is not BERT-like), so the text cannot be encoded.",
            file=sys.stderr,
        )
        return 2
    progress = sys.stderr.isatty()  # tqdm bars for people, not for logs
    kept: list[Path] = []  # the readable images, in the order they are encoded

    def pixel_batches() -> Iterator[torch.Tensor]:
        """Decode one batch at a time (a large folder never sits in memory as pixels), skipping unreadable files."""
        for start in range(0, len(paths), args.batch_size):
            images, batch_paths = [], []
            for path in paths[start : start + args.batch_size]:
                image = _read_image(path, args.command)
                if image is not None:
                    images.append(image)
                    batch_paths.append(path)
            if images:
                kept.extend(batch_paths)
                yield processor(images=images, return_tensors="pt")["pixel_values"]

    with torch.inference_mode():
        try:
            images = encode_images(model, pixel_batches(), device=device, progress=progress)
        except ValueError:
            if kept:  # not the "no image batches" case
                raise
            print(f"blip2-hf retrieve: error: no readable image in {args.images}.", file=sys.stderr)
            return 2
        tokens = tokenizer(
            [pre_caption(args.text)], truncation=True, max_length=RETRIEVAL_TEXT_MAX_LENGTH, return_tensors="pt"
        )
        texts = encode_texts(model, [tokens], device=device, progress=False)
        itc = itc_similarity(images.image_feats, texts.text_feats)  # [N_img, 1]
        k = min(max(args.rerank_k, args.top_k), len(kept))
        # `itm_rerank` scores both directions; with one text its image-to-text side would send *every* image
        # through ITM. Handing it only the text's ITC top-k images gives the same text-to-image scores for k passes.
        candidates = itc[:, 0].topk(k).indices
        candidate_index = ImageIndex(
            images.image_feats[candidates], images.image_embeds[candidates.to(images.image_embeds.device)]
        )
        _, score_t2i = itm_rerank(
            model, candidate_index, texts, itc[candidates], k=k, batch_size=args.batch_size, progress=progress
        )
        # Stable: equal scores keep the ITC order.
        scores, order = torch.sort(score_t2i[0], descending=True, stable=True)
    for rank, (score, index) in enumerate(zip(scores[: args.top_k].tolist(), order[: args.top_k].tolist()), 1):
        print(f"{rank}\t{score:.4f}\t{kept[int(candidates[index])]}")
    return 0


def add_demo_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="A miniature BLIP-2 trained and evaluated end to end on CPU: synthetic world, frozen towers, both stages, "
        "evaluation, the paper's ablations, a report.",
        description="Generate a synthetic world of colored shapes; load the shipped off-the-shelf towers (a small ViT "
        "trained by scene tagging, no text, and a small OPT-style LLM trained on text alone) and freeze them; train "
        "BLIP-2 stage 1 (ITC + ITM + ITG) and stage 2, stage 2 without stage 1 (the paper's Figure 5) and stage 1 "
        "without ITG (Table 6); evaluate captioning, zero-shot VQA and retrieval; write checkpoints, results.json, "
        "plots and report.md into --output. The `caption`, `ask` and `retrieve` commands then use its checkpoints. "
        "--build-towers DIR instead trains the towers themselves (about 33 minutes on 2 CPU cores).",
    )
    parser.add_argument("--quick", action="store_true", help="A smaller world and budget (about 90 s on CPU).")
    parser.add_argument(
        "--seeds", type=_positive_int, default=1, help="BLIP-2 training seeds; 3 gives mean +- std (default 1)."
    )
    parser.add_argument(
        "--output", type=Path, default=None, help="Output folder (default: $BLIP2_HF_DEMO_DIR, else ./blip2_demo)."
    )
    parser.add_argument(
        "--build-towers",
        type=Path,
        default=None,
        metavar="DIR",
        help="Build the demo's frozen towers into the new folder DIR (what ships in blip2_hf/demo/towers) and exit.",
    )
    parser.set_defaults(func=run_demo_command)


def run_demo_command(args: argparse.Namespace) -> int:
    if args.build_towers is not None:
        from .demo.towers import build_towers

        manifest = build_towers(args.build_towers)
        probe = manifest["quality"]["probe"]
        print(f"towers: {args.build_towers} ({manifest['wall_time_s']['total_training']:.0f} s of training)")
        print("linear probe on the demo world's test images (%): " + ", ".join(
            f"{name} {m['accuracy']:.1f}" for name, m in probe.items()))  # fmt: skip
        llm = manifest["quality"]["llm"]
        print(
            f"LLM, text only: {llm['with_caption']:.1f}% with the true caption, {llm['without_context']:.1f}% without"
        )
        return 0
    from .demo.run import run_demo

    output = args.output if args.output is not None else demo_dir()
    run_demo(output, seeds=args.seeds, quick=args.quick)
    print(f"report: {output / 'report.md'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blip2-hf", description="BLIP-2 on the Hugging Face stack.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_demo_command(subparsers)
    add_push_command(subparsers)
    add_card_command(subparsers)
    add_caption_command(subparsers)
    add_ask_command(subparsers)
    add_retrieve_command(subparsers)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The parsed command line (default: `sys.argv[1:]`); needs no torch (see `blip2_hf_launch`)."""
    return build_parser().parse_args(argv)


def run(args: argparse.Namespace) -> int:
    """Run the parsed command; returns its exit code. Errors a user can fix are one line on stderr, exit code 1."""
    import transformers

    from .hub import PushError
    from .modeling_blip2 import CheckpointMismatchError

    # The package's progress messages on stderr; the libraries' own loggers keep their settings.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    package_logger = logging.getLogger("blip2_hf")
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO)
    loading_bars = transformers.utils.logging.is_progress_bar_enabled()
    if not sys.stderr.isatty():  # the per-tensor "Loading weights" bar: noise in a log, transient on a terminal
        transformers.utils.logging.disable_progress_bar()
    try:
        return args.func(args)
    except (PushError, FileNotFoundError, FileExistsError, ValueError, CheckpointMismatchError) as err:
        print(f"blip2-hf {args.command}: error: {err}", file=sys.stderr)
        return 1
    finally:
        package_logger.removeHandler(handler)
        if loading_bars:
            transformers.utils.logging.enable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    """`blip2-hf`: parse, run, return the exit code. The console script is `blip2_hf_launch.main`, the same with the
    package's heavy imports after the parsing."""
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
