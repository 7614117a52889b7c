"""Small tokenizers trained on the spot with the `tokenizers` library, in the special-token layouts of the model
families BLIP-2 connects: OPT (byte-level BPE), T5 and LLaMA (SentencePiece-style Metaspace BPE) and the Q-Former's
BERT (WordPiece, plus `[DEC]` as in LAVIS). The demo trains its towers' tokenizers with them on its world's texts,
and `testing_utils` trains them on its test corpus.

Each builder trains once per process for a given `(corpus, vocab_size)` (`functools.cache`) and returns a deep copy,
so that a caller that changes its tokenizer (a processor adding `<image>`) cannot change another caller's."""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast


def _wrap(tokenizer: Tokenizer, **kwargs) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **kwargs)


@functools.cache
def _opt_tokenizer(vocab_size: int, corpus: tuple[str, ...]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    # OPT's quirk: its BOS is `</s>` (id 2), prepended to every sequence.
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    return _wrap(tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>", padding_side="left")


def _metaspace_bpe(vocab_size: int, corpus: tuple[str, ...], special_tokens: list[str]) -> Tokenizer:
    """A SentencePiece-style (Metaspace) BPE trained on `corpus`, `<unk>` for unknown characters."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False)
    )
    return tok


@functools.cache
def _t5_tokenizer(vocab_size: int, corpus: tuple[str, ...]) -> PreTrainedTokenizerFast:
    # SentencePiece-style (Metaspace) BPE rather than Unigram: on a corpus this small the Unigram trainer stops far
    # below the requested vocabulary size, BPE reaches it exactly.
    tok = _metaspace_bpe(vocab_size, corpus, ["<pad>", "</s>", "<unk>"])
    # T5 has no BOS; `</s>` closes every sequence.
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    return _wrap(tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", padding_side="right")


@functools.cache
def _llama_tokenizer(vocab_size: int, corpus: tuple[str, ...]) -> PreTrainedTokenizerFast:
    # SentencePiece-style BPE (Metaspace), as in LLaMA-1/2 and Vicuna, without byte fallback (no room for 256
    # byte tokens in a 300-token vocabulary; unknown characters map to `<unk>`).
    tok = _metaspace_bpe(vocab_size, corpus, ["<unk>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    # Vicuna (InstructBLIP) pads with `<unk>` (pad_token_id=0), LLaMA itself ships without a pad token.
    return _wrap(tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>", padding_side="left")


@functools.cache
def _bert_tokenizer(vocab_size: int, corpus: tuple[str, ...]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tokenizer = _wrap(
        tok,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
        padding_side="right",
    )
    # BLIP-2 stage 1 (LAVIS `init_tokenizer`): `[DEC]` is added as BOS and replaces `[CLS]` for the generative
    # (image-grounded text generation) loss.
    tokenizer.add_special_tokens({"bos_token": AddedToken("[DEC]", special=True, normalized=False)})
    return tokenizer


def train_opt_tokenizer(corpus: Sequence[str], vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """OPT-style byte-level BPE: `<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3; BOS is `</s>` (prepended), left padding."""
    return copy.deepcopy(_opt_tokenizer(vocab_size, tuple(corpus)))


def train_t5_tokenizer(corpus: Sequence[str], vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """T5-style Metaspace BPE: `<pad>`=0, `</s>`=1, `<unk>`=2; no BOS, `</s>` appended, right padding."""
    return copy.deepcopy(_t5_tokenizer(vocab_size, tuple(corpus)))


def train_llama_tokenizer(corpus: Sequence[str], vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """LLaMA-style Metaspace BPE: `<unk>`=0 (also the pad token), `<s>`=1 (prepended), `</s>`=2, left padding."""
    return copy.deepcopy(_llama_tokenizer(vocab_size, tuple(corpus)))


def train_bert_tokenizer(corpus: Sequence[str], vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """Q-Former BERT WordPiece (lowercase): `[PAD]`=0, `[UNK]`=1, `[CLS]`=2, `[SEP]`=3, `[MASK]`=4, plus `[DEC]` as
    `bos_token` (id = trained vocabulary size, i.e. the last id); `[CLS] $A [SEP]`, right padding."""
    return copy.deepcopy(_bert_tokenizer(vocab_size, tuple(corpus)))
