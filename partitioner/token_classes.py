"""The token ids of each public token class a policy names (``rnm.public``, issue 15).

A public token passes RNM unchanged and spends no ε: the GPU sees it as it is. The classes:

* ``special``: the model's special tokens (BOS, EOS, PAD, the chat template's markers), which
  RNM has always passed through;
* ``stopwords``: scikit-learn's English stopword list (318 words, the list the SST-2 harness
  uses for CusText+), matched on a token's decoded text. A WordPiece continuation (``##the``)
  is never a stopword; a byte-level BPE token without its leading space (``the``) may be the
  start of a longer word (``the`` + ``ater``), so passing it tells the GPU that much;
* ``punctuation``: tokens whose decoded text is punctuation or symbols only (Unicode
  categories P and S, ASCII punctuation), never a token that decodes to a replacement
  character (a byte of a multi-byte character);
* ``PATH.txt``: the token ids in a file, one per line.

Compile-time only: the plan records the classes and how many ids each holds, and the RNM
tables carry the pass-through mask the enclave applies.
"""

from __future__ import annotations

import string
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from partitioner.errors import PolicyError


def _decoded(tokenizer: Any, vocab: int) -> list[tuple[str, str]]:
    """(raw token, decoded text) of every id the tokenizer names (an embedding may have
    more rows than that: those ids are in no class)."""
    raw = tokenizer.convert_ids_to_tokens(list(range(min(vocab, len(tokenizer)))))
    return [(r or "", tokenizer.decode([i])) for i, r in enumerate(raw)]


def _is_punctuation(text: str) -> bool:
    text = text.strip()
    return bool(text) and all(
        c in string.punctuation or (unicodedata.category(c)[0] in "PS" and c != "\ufffd")
        for c in text
    )


def stopword_ids(tokenizer: Any, vocab: int) -> list[int]:
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return [
        i
        for i, (raw, text) in enumerate(_decoded(tokenizer, vocab))
        if not raw.startswith("##") and text.strip().lower() in ENGLISH_STOP_WORDS
    ]


def punctuation_ids(tokenizer: Any, vocab: int) -> list[int]:
    return [i for i, (_, text) in enumerate(_decoded(tokenizer, vocab)) if _is_punctuation(text)]


def file_ids(path: Path, vocab: int) -> list[int]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"rnm.public file {path}: {getattr(exc, 'strerror', exc)}") from None
    ids = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = int(line.strip())
        except ValueError:
            raise PolicyError(
                f"rnm.public file {path}:{number}: {line!r} is not a token id"
            ) from None
        if not 0 <= value < vocab:
            raise PolicyError(
                f"rnm.public file {path}:{number}: token id {value} is outside the vocabulary "
                f"of {vocab}"
            )
        ids.append(value)
    return ids


def public_tokens(
    tokenizer: Any,
    classes: Sequence[str],
    vocab_size: int | None = None,
    special: Iterable[int] = (),
) -> dict[str, list[int]]:
    """Per class of ``classes`` (``rnm.public``), its token ids; ``special`` are the model's
    special tokens (``Captured.special_token_ids``)."""
    vocab = int(vocab_size if vocab_size is not None else len(tokenizer))
    out: dict[str, list[int]] = {}
    for name in classes:
        if name == "special":
            out[name] = sorted(set(special) | set(getattr(tokenizer, "all_special_ids", [])))
        elif name == "stopwords":
            out[name] = stopword_ids(tokenizer, vocab)
        elif name == "punctuation":
            out[name] = punctuation_ids(tokenizer, vocab)
        else:
            out[name] = file_ids(Path(name), vocab)
    return out


__all__ = ["public_tokens", "punctuation_ids", "stopword_ids"]
