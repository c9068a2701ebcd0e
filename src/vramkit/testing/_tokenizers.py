"""Offline tokenizers for the tiny FLUX test bed.

FLUX pipelines need a CLIP tokenizer and a T5 tokenizer. The real ones live on the Hugging Face hub,
which tests must never touch, so both are built here in memory with the ``tokenizers`` package and
wrapped in :class:`transformers.PreTrainedTokenizerFast`. They tokenize any text: characters outside
their small vocabularies map to the unknown token, so every id stays below the vocabulary size.
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

__all__ = ["CLIP_MAX_LENGTH", "T5_MAX_LENGTH", "clip_tokenizer", "t5_tokenizer"]

#: CLIP's context length; FluxPipeline pads CLIP input to ``tokenizer.model_max_length``.
CLIP_MAX_LENGTH = 77
#: T5 sequence limit; the pipelines pad T5 input to ``max_sequence_length`` themselves.
T5_MAX_LENGTH = 512

_CLIP_BOS = "<|startoftext|>"
_CLIP_EOS = "<|endoftext|>"
_CLIP_SUFFIX = "</w>"

_T5_PAD, _T5_EOS, _T5_UNK = "<pad>", "</s>", "<unk>"
_T5_SPACE = "\u2581"  # SentencePiece's word-boundary marker "▁"

# A handful of whole words, so both tokenizers do real merging / segmentation instead of only
# spelling text out character by character.
_COMMON_WORDS = ("a", "the", "and", "of", "red", "fox", "cat", "tiny", "photo", "in", "on", "with")
_CHARACTERS = string.ascii_lowercase + string.digits + string.punctuation


def _bpe_merges(words: tuple[str, ...]) -> list[tuple[str, str]]:
    """Left-to-right merges that assemble each word (with the ``</w>`` suffix) from its characters."""
    merges: list[tuple[str, str]] = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + _CLIP_SUFFIX]
        left = pieces[0]
        for right in pieces[1:]:
            if (left, right) not in merges:
                merges.append((left, right))
            left = left + right
    return merges


def _clip_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Characters, end-of-word characters, merge results, then the two specials (as in real CLIP)."""
    tokens: list[str] = list(_CHARACTERS) + [c + _CLIP_SUFFIX for c in _CHARACTERS]
    for left, right in merges:
        if left + right not in tokens:
            tokens.append(left + right)
    tokens += [_CLIP_BOS, _CLIP_EOS]
    return {token: index for index, token in enumerate(tokens)}


def clip_tokenizer() -> PreTrainedTokenizerFast:
    """A CLIP-style BPE tokenizer: lower-cased, ``</w>`` word suffix, ``<|startoftext|> ... <|endoftext|>``.

    As in CLIP, the end token doubles as the pad and unknown token, and ``model_max_length`` is 77
    (the default, about 1e30, would make FluxPipeline pad to an absurd length).
    """
    merges = _bpe_merges(_COMMON_WORDS)
    vocab = _clip_vocab(merges)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=_CLIP_EOS, end_of_word_suffix=_CLIP_SUFFIX))
    # Stripping accents keeps most Latin text off the unknown token, which here is also the end token
    # (as in CLIP) and so would move the position CLIPTextModel pools from.
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.BPEDecoder(suffix=_CLIP_SUFFIX)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{_CLIP_BOS} $A {_CLIP_EOS}",
        pair=f"{_CLIP_BOS} $A {_CLIP_EOS} $B {_CLIP_EOS}",
        special_tokens=[(_CLIP_BOS, vocab[_CLIP_BOS]), (_CLIP_EOS, vocab[_CLIP_EOS])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=_CLIP_BOS,
        eos_token=_CLIP_EOS,
        unk_token=_CLIP_EOS,
        pad_token=_CLIP_EOS,
        model_max_length=CLIP_MAX_LENGTH,
    )


def _t5_vocab() -> list[tuple[str, float]]:
    """Unigram pieces with log-probabilities: specials first (ids 0, 1, 2 as in T5), then pieces.

    Whole words score highest so that segmentation prefers them; single characters are the fallback.
    """
    characters = string.ascii_letters + string.digits + string.punctuation
    pieces: list[tuple[str, float]] = [(_T5_PAD, 0.0), (_T5_EOS, 0.0), (_T5_UNK, 0.0), (_T5_SPACE, -2.0)]
    pieces += [(_T5_SPACE + word, -1.0) for word in _COMMON_WORDS if len(word) > 1]
    pieces += [(_T5_SPACE + c, -4.0) for c in characters]
    pieces += [(c, -5.0) for c in characters]
    return pieces


def t5_tokenizer() -> PreTrainedTokenizerFast:
    """A T5-style Unigram tokenizer with ``<pad>``=0, ``</s>``=1, ``<unk>``=2 and ``</s>`` appended."""
    vocab = _t5_vocab()
    eos_id = next(index for index, (piece, _) in enumerate(vocab) if piece == _T5_EOS)
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_T5_SPACE, prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement=_T5_SPACE, prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {_T5_EOS}",
        pair=f"$A {_T5_EOS} $B {_T5_EOS}",
        special_tokens=[(_T5_EOS, eos_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=_T5_EOS,
        unk_token=_T5_UNK,
        pad_token=_T5_PAD,
        model_max_length=T5_MAX_LENGTH,
    )
