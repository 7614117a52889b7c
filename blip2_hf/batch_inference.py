"""Captioning folders and answering question files at scale: what `blip2-hf caption` / `blip2-hf ask` run.

Images stream through a `torch.utils.data.DataLoader` whose workers read, decode and preprocess them (the main process
only generates), in batches; each batch's results come back as soon as it is done, so a caller can write them as it
goes. `ResultsFile` is that writer: a JSON Lines file that a rerun resumes (what it holds is skipped, a line cut by a
kill is dropped, nothing is written twice).

    paths = expand_image_sources(["photos/", "more/*.jpg"])
    for records in caption_images(model, processor, paths, batch_size=16, num_beams=3, max_new_tokens=30):
        ...  # [{"image": path, "caption": text} or {"image": path, "error": "OSError: ..."}], in order

Questions are grouped by image: a batch holds whole images' questions (at most `batch_size` questions, or one image's
all), each image decoded once; today every question is a row with its own copy of the image's pixels.

No torch at import time: `blip2_hf.cli` imports this module before its parsers answer `--help`.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from .processing_blip2 import Blip2Processor

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
# Worker processes at most: decoding and resizing a photo takes a few ms, so a few workers keep a GPU fed; more only
# take cores from the main process.
MAX_DEFAULT_WORKERS = 8
# On CPU the model's own threads use every core, and a busy worker process stalls their barriers (measured on 2 cores:
# 8 tiny-model images took 4x longer with 1 worker): workers only from this many cores up.
MIN_CPU_CORES_FOR_WORKERS = 8


def default_num_workers(device: torch.device | str = "cuda") -> int:
    """
    DataLoader workers by default. On a GPU: half the cores this process may use (1 to 8), the other half left to
    the main process. On CPU, where the model's threads compete with the workers for the cores: 0 below 8 cores,
    else a quarter of them (at most 8).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if str(device).startswith("cuda"):
        return max(1, min(MAX_DEFAULT_WORKERS, cores // 2))
    return 0 if cores < MIN_CPU_CORES_FOR_WORKERS else min(MAX_DEFAULT_WORKERS, cores // 4)


DTYPES = ("auto", "float32", "float16", "bfloat16")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """
    The weights' dtype for `--dtype name` on `device`: "auto" is bfloat16 on a GPU that supports it (float16 on one
    that does not) and float32 on CPU.

    Raises:
        ValueError: float16 on CPU (many CPU kernels lack it, and those that have it are slower than float32).
    """
    import torch

    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}.")
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name == "float16" and device.type == "cpu":
        raise ValueError("--dtype float16 needs a GPU (--device cuda); on CPU use float32 or bfloat16.")
    return getattr(torch, name)


# ---------------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------------


def _is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def _images_under(folder: Path) -> list[Path]:
    """The image files anywhere under `folder` (any extension case), sorted by their path."""
    return sorted((path for path in folder.rglob("*") if _is_image_file(path)), key=lambda path: path.as_posix())


def expand_image_sources(
    sources: Sequence[str | os.PathLike], unique: bool = False, problems: list[str] | None = None
) -> list[Path]:
    """
    Image files from command-line arguments, in argument order: a folder gives the images under it (recursively,
    `IMAGE_EXTENSIONS` of any case, sorted); a pattern with `*`, `?` or `[` that is not itself a file gives its sorted
    matches (`**` crosses folders; matched folders expand as folders); anything else is taken as one image file, even
    if missing or not an image (reading it then fails and is reported per file).

    Args:
        sources: the arguments.
        unique: drop a file met again (same absolute path) after its first occurrence.
        problems: if given, a folder with no image files or a pattern matching none is described here (and skipped)
            instead of raising.

    Raises:
        ValueError: a folder with no image files, or a pattern matching none (named); not with `problems`.
    """
    paths: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            found = _images_under(path)
            if not found:
                _problem(f"{source}: the folder holds no image files ({', '.join(IMAGE_EXTENSIONS)}).", problems)
        elif not path.exists() and glob.has_magic(str(source)):
            found = []
            for match in sorted(glob.glob(str(source), recursive=True)):
                match_path = Path(match)
                found.extend(_images_under(match_path) if match_path.is_dir() else [match_path])
            found = [match for match in found if match.suffix.lower() in IMAGE_EXTENSIONS]
            if not found:
                _problem(f"{source}: the pattern matches no image files ({', '.join(IMAGE_EXTENSIONS)}).", problems)
        else:
            found = [path]
        paths.extend(found)
    if unique:
        seen: set[str] = set()
        paths = [path for path in paths if not (image_key(path) in seen or seen.add(image_key(path)))]
    return paths


def _problem(message: str, problems: list[str] | None) -> None:
    if problems is None:
        raise ValueError(message)
    problems.append(message)


def image_key(path: str | os.PathLike) -> str:
    """How a results file names an image for resuming: its absolute, normalised path (`./a.png` is `a.png`)."""
    return os.path.abspath(path)


@dataclass(frozen=True)
class Question:
    """One question about one image: `image` as written in the questions file, `path` where it is read from."""

    image: str
    path: Path
    question: str
    question_id: Any = None

    def key(self) -> tuple:
        """Resume key: the question_id when there is one, else (image, question)."""
        return ("id", self.question_id) if self.question_id is not None else ("pair", self.image, self.question)

    def record(self) -> dict[str, Any]:
        """The fields a results line repeats from the question."""
        out: dict[str, Any] = {"image": self.image, "question": self.question}
        if self.question_id is not None:
            out["question_id"] = self.question_id
        return out


def read_questions(file: str | os.PathLike, image_root: str | os.PathLike | None = None) -> list[Question]:
    """
    The questions of a JSON Lines file (one object per line, blank lines allowed) or of a JSON list of objects, each
    `{"image": PATH, "question": TEXT}` with an optional `"question_id"` (a string or an integer, unique). A relative
    image path is read from `image_root` (default: the questions file's folder).

    Raises:
        ValueError: not JSON, not objects, a missing or mistyped key, a repeated question_id, or the same (image,
            question) twice without ids; the message names the file and the line (JSON Lines) or item (JSON list).
    """
    file = Path(file)
    root = Path(image_root) if image_root is not None else file.parent
    text = file.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{file}: not valid JSON: {err}") from None
        entries = [(f"item {index}", item) for index, item in enumerate(items)]
    else:
        entries = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                entries.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise ValueError(f"{file}, line {number}: not valid JSON ({err.msg}): {line[:80]!r}") from None
    questions: list[Question] = []
    first_seen: dict[tuple, str] = {}
    for where, item in entries:
        question = _parse_question(item, f"{file}, {where}", root)
        if question.key() in first_seen:
            what = f"question_id {question.question_id!r}" if question.question_id is not None else "question"
            hint = "" if question.question_id is not None else "; give each a distinct question_id to ask both"
            raise ValueError(f"{file}, {where}: the same {what} as {first_seen[question.key()]}{hint}.")
        first_seen[question.key()] = where
        questions.append(question)
    if not questions:
        raise ValueError(f"{file}: no questions in it.")
    return questions


def _parse_question(item: Any, where: str, root: Path) -> Question:
    """One entry of a questions file, checked."""
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected an object with 'image' and 'question', got {type(item).__name__}.")
    for key in ("image", "question"):
        if key not in item:
            raise ValueError(f"{where}: missing key {key!r} (has: {', '.join(map(repr, item)) or 'none'}).")
        if not isinstance(item[key], str) or not item[key].strip():
            raise ValueError(f"{where}: {key!r} must be a non-empty string, got {item[key]!r}.")
    question_id = item.get("question_id")
    if question_id is not None and (isinstance(question_id, bool) or not isinstance(question_id, (str, int))):
        raise ValueError(f"{where}: 'question_id' must be a string or an integer, got {question_id!r}.")
    return Question(item["image"], root / item["image"], item["question"], question_id)


# ---------------------------------------------------------------------------------------------------------------------
# Loading: decoding and preprocessing in DataLoader workers
# ---------------------------------------------------------------------------------------------------------------------


class ImageFiles:
    """A map-style dataset: item `i` is `(i, pixel_values (3, H, W) float32, None)` for the image at `paths[i]`, or
    `(i, None, "ErrorType: message")` when it cannot be read or preprocessed. Errors are returned, not raised, so one
    broken file does not stop a worker (and the whole run)."""

    def __init__(self, paths: Sequence[Path], image_processor: Any):
        self.paths = list(paths)
        self.image_processor = image_processor

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        from .processing_blip2 import load_image

        try:
            image = load_image(self.paths[index])
            pixel_values = self.image_processor(image, return_tensors="pt")["pixel_values"][0]
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ... for broken files
            return index, None, f"{type(err).__name__}: {err}"
        return index, pixel_values, None


def collate_images(items: list[tuple[int, torch.Tensor | None, str | None]]) -> dict[str, Any]:
    """A batch: `indices` of all items (in order), `pixel_values` `(B_ok, 3, H, W)` of the readable ones (None if
    none), `ok` their indices, `errors` `{index: message}` of the others. A dict, so `pin_memory` pins the pixels."""
    import torch

    readable = [(index, pixels) for index, pixels, _ in items if pixels is not None]
    return {
        "indices": [index for index, _, _ in items],
        "ok": [index for index, _ in readable],
        "pixel_values": torch.stack([pixels for _, pixels in readable]) if readable else None,
        "errors": {index: error for index, _, error in items if error is not None},
    }


def image_loader(
    paths: Sequence[Path],
    image_processor: Any,
    batches: Iterable[list[int]],
    num_workers: int,
    pin_memory: bool = False,
) -> Iterator[dict[str, Any]]:
    """`collate_images` batches of `paths` (index lists `batches`, in order), read by `num_workers` worker processes
    (0: in this process) while the caller works on the previous batches."""
    from torch.utils.data import DataLoader

    batches = list(batches)
    workers = min(num_workers, len(batches))  # an idle worker still costs a process start
    return iter(
        DataLoader(
            ImageFiles(paths, image_processor),
            batch_sampler=batches,
            num_workers=workers,
            collate_fn=collate_images,
            pin_memory=pin_memory,
            persistent_workers=False,
        )
    )


# ---------------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------------


def generate_texts(
    model: PreTrainedModel,
    processor: Blip2Processor,
    pixel_values: torch.Tensor,
    prompts: list[str],
    image_rows: torch.LongTensor | None = None,
    **generate_kwargs: Any,
) -> list[str]:
    """
    Generate after each row's prompt and return the new text only, stripped.

    Args:
        pixel_values: `(B, 3, H, W)`, row `b` the image of `prompts[b]` (any device and dtype: moved to the model's);
            with `image_rows`, `(N, 3, H, W)` distinct images, each encoded once.
        prompts: `B` prompts; "" captions from the image alone.
        image_rows: `(B,)` the image of each prompt (`generate(image_rows=...)`), or None: one image per row.
    """
    # Always through the processor, even without a prompt: "" tokenizes to `[<image> x Q, BOS]` (T5: `</s>`), what
    # the model builds for image-only input, and the input length is then known for cutting the prompt off below.
    # Left padding, as evaluation/vqa.py: a decoder-only LLM continues from each row's last token.
    inputs = processor(text=prompts, padding=True, padding_side="left", return_tensors="pt").to(model.device)
    inputs["pixel_values"] = pixel_values.to(model.device, model.vision_model.dtype, non_blocking=True)
    if image_rows is not None:
        inputs["image_rows"] = image_rows.to(model.device)
    from .inference import decode_answers

    ids = model.generate(**inputs, **generate_kwargs)
    return decode_answers(model, processor, ids, inputs["input_ids"].shape[1])


def caption_images(
    model: PreTrainedModel,
    processor: Blip2Processor,
    paths: Sequence[Path],
    prompt: str = "",
    batch_size: int = 16,
    num_workers: int = 0,
    **generate_kwargs: Any,
) -> Iterator[list[dict[str, Any]]]:
    """
    Caption `paths` (after `prompt`, "" for none) in batches of `batch_size` images, read by `num_workers`
    DataLoader workers; yields each batch's records in order, `{"image": str(path), "caption": text}` or
    `{"image": str(path), "error": "ErrorType: message"}` for an image that cannot be read. Call under
    `torch.inference_mode()`.
    """
    batches = [list(range(start, min(start + batch_size, len(paths)))) for start in range(0, len(paths), batch_size)]
    pin = model.device.type == "cuda"
    for batch in image_loader(paths, processor.image_processor, batches, num_workers, pin_memory=pin):
        texts: dict[int, str] = {}
        if batch["pixel_values"] is not None:
            prompts = [prompt] * len(batch["ok"])
            texts = dict(
                zip(batch["ok"], generate_texts(model, processor, batch["pixel_values"], prompts, **generate_kwargs))
            )
        yield [
            {"image": str(paths[i]), "caption": texts[i]}
            if i in texts
            else {"image": str(paths[i]), "error": batch["errors"][i]}
            for i in batch["indices"]
        ]


def group_by_image(
    questions: Sequence[Question], batch_size: int
) -> tuple[list[Path], list[list[Question]], list[list[int]]]:
    """
    `(paths, per_image, batches)`: the distinct images in order of first appearance, each one's questions (file
    order), and batches of image indices holding whole images' questions, at most `batch_size` questions each (an
    image with more questions than that is a batch of its own).
    """
    index_of: dict[Path, int] = {}
    per_image: list[list[Question]] = []
    for question in questions:
        if question.path not in index_of:
            index_of[question.path] = len(per_image)
            per_image.append([])
        per_image[index_of[question.path]].append(question)
    from .inference import batches_by_image  # imports torch: not at this module's load (the CLI's --help)

    batches = list(batches_by_image([len(asked) for asked in per_image], batch_size))
    return list(index_of), per_image, batches


def answer_question_records(
    model: PreTrainedModel,
    processor: Blip2Processor,
    questions: Sequence[Question],
    prompt_template: str,
    batch_size: int = 16,
    num_workers: int = 0,
    use_chat_template: bool = False,
    **generate_kwargs: Any,
) -> Iterator[list[dict[str, Any]]]:
    """
    Answer `questions` (`prompt_template.format(question)` is the prompt, put into the LLM tokenizer's chat template
    as a user turn with `use_chat_template`, see `Blip2Processor.chat_prompt`) grouped by image (`group_by_image`): each
    image decoded once, its questions in one batch. Yields each batch's records, `question.record()` plus `"answer"`,
    or plus `"error"` for every question of an unreadable image. Call under `torch.inference_mode()`.
    """
    paths, per_image, batches = group_by_image(questions, batch_size)
    pin = model.device.type == "cuda"
    for batch in image_loader(paths, processor.image_processor, batches, num_workers, pin_memory=pin):
        answers: list[str] = []
        asked = [question for index in batch["ok"] for question in per_image[index]]
        if asked:
            import torch

            # Each image encoded once for all its questions (and, for decoder-only LLMs, the prompt part they share)
            counts = torch.tensor([len(per_image[index]) for index in batch["ok"]])
            image_rows = torch.repeat_interleave(torch.arange(len(counts)), counts)
            prompts = [prompt_template.format(question.question) for question in asked]
            if use_chat_template:
                prompts = [processor.chat_prompt(prompt) for prompt in prompts]
            answers = generate_texts(
                model, processor, batch["pixel_values"], prompts, image_rows=image_rows, **generate_kwargs
            )
        answer_of = {question.key(): answer for question, answer in zip(asked, answers)}
        records = []
        for index in batch["indices"]:
            for question in per_image[index]:
                if index in batch["errors"]:
                    records.append({**question.record(), "error": batch["errors"][index]})
                else:
                    records.append({**question.record(), "answer": answer_of[question.key()]})
        yield records


# ---------------------------------------------------------------------------------------------------------------------
# Results file: append as we go, resume on rerun
# ---------------------------------------------------------------------------------------------------------------------


class ResultsFile:
    """
    A JSON Lines results file written as a run goes and resumed by the next run with the same path.

    Opening reads what is there: a last line without its newline (the process was killed while writing it) is cut
    off the file (`dropped_partial` says so); any other line that is not a JSON object with `required` keys raises
    ValueError naming the line (not a results file of this command). `done` holds the keys (`key_of(record)`) of every
    record; `errors` the keys of error records. `retry_errors=True` rewrites the file without its error records (an
    atomic replace), so that they are tried again. `append` writes one batch's records and flushes them: a kill
    loses at most the batch in flight.
    """

    def __init__(self, path: str | os.PathLike, key_of: Any, required: Sequence[str], retry_errors: bool = False):
        self.path = Path(path)
        self.key_of = key_of
        self.done: set = set()
        self.errors: set = set()
        self.dropped_partial = False
        self.retried = 0
        records = self._read(required)
        if retry_errors and any("error" in record for record in records):
            kept = [record for record in records if "error" not in record]
            self.retried = len(records) - len(kept)
            temporary = self.path.with_name(self.path.name + ".tmp")
            temporary.write_text("".join(_line(record) for record in kept), encoding="utf-8")
            os.replace(temporary, self.path)
            records = kept
        for record in records:
            self.done.add(key_of(record))
            if "error" in record:
                self.errors.add(key_of(record))
        self._file = None

    def _read(self, required: Sequence[str]) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        complete = data.rfind(b"\n") + 1
        if complete < len(data):  # a line cut by a kill: drop it, its batch is redone
            with open(self.path, "r+b") as file:
                file.truncate(complete)
            self.dropped_partial = True
        records = []
        for number, line in enumerate(data[:complete].decode("utf-8").splitlines(), 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict) or not all(key in record for key in required):
                raise ValueError(
                    f"{self.path}, line {number}: not a results line of this command (a JSON object with "
                    f"{', '.join(map(repr, required))}): {line[:80]!r}. Use another --output."
                )
            records.append(record)
        return records

    def append(self, records: list[dict[str, Any]]) -> None:
        """Write `records` (one line each) and flush."""
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (open for the whole run)
        self._file.write("".join(_line(record) for record in records))
        self._file.flush()
        for record in records:
            self.done.add(self.key_of(record))
            if "error" in record:
                self.errors.add(self.key_of(record))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> ResultsFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _line(record: dict[str, Any]) -> str:
    """One record as one line: `json.dumps` escapes newlines inside strings, so a caption cannot split it."""
    return json.dumps(record, ensure_ascii=False) + "\n"


def caption_key(record: dict[str, Any]) -> str:
    """A caption record's resume key."""
    return image_key(record["image"])


def answer_key(record: dict[str, Any]) -> tuple:
    """An answer record's resume key, as `Question.key`."""
    if record.get("question_id") is not None:
        return ("id", record["question_id"])
    return ("pair", record["image"], record["question"])
