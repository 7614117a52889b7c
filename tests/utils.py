"""Offline helpers shared by the test suite: tiny tokenizers trained on the spot and drawn test images.

Nothing here touches the Hugging Face Hub. Every tokenizer is trained with the `tokenizers` library on the small
English corpus below (captions and "Question: ... Answer: ..." prompts), wrapped in a `PreTrainedTokenizerFast`, and
copies the special-token layout of the model family it stands in for (ids for the default `vocab_size=300`):

| builder                | stands in for    | special ids                                                    | added per sequence | padding |
|------------------------|------------------|----------------------------------------------------------------|--------------------|---------|
| `make_opt_tokenizer`   | OPT              | `<s>`=0 `<pad>`=1 `</s>`=2 `<unk>`=3                             | BOS `</s>` first   | left    |
| `make_t5_tokenizer`    | (Flan-)T5        | `<pad>`=0 `</s>`=1 `<unk>`=2                                     | EOS `</s>` last    | right   |
| `make_llama_tokenizer` | LLaMA / Vicuna   | `<unk>`=0 (also pad) `<s>`=1 `</s>`=2                            | BOS `<s>` first    | left    |
| `make_bert_tokenizer`  | Q-Former (BERT)  | `[PAD]`=0 `[UNK]`=1 `[CLS]`=2 `[SEP]`=3 `[MASK]`=4 `[DEC]`=300 (BOS) | `[CLS] ... [SEP]`  | right   |

OPT, T5 and LLaMA have exactly `vocab_size` tokens; BERT has one more (`[DEC]`). Each builder trains once per process
(`functools.cache`) and returns a deep copy, so a test that mutates its tokenizer (a processor adding `<image>`)
cannot leak into another test. Import as `from utils import ...` (pytest puts `tests/` on `sys.path`). The builders live in
`blip2_hf.tokenizer_training` (the demo and the tiny training setup use them too), with the corpus default in
`blip2_hf.testing_utils`; this module re-exports them.
"""

from __future__ import annotations

from blip2_hf.testing_utils import (  # noqa: F401  (re-exported for the tests)
    CORPUS,
    draw_images,
    make_bert_tokenizer,
    make_llama_tokenizer,
    make_opt_tokenizer,
    make_t5_tokenizer,
)

# Paper benchmarks by name, as words: a card or result for custom data must name none of them.
BENCHMARK_NAMES = (
    "VQAv2",
    "vqav2",
    "OK-VQA",
    "GQA",
    "COCO",
    "coco",
    "Karpathy",
    "NoCaps",
    "Flickr",
    "flickr30k",
    "okvqa",
)
