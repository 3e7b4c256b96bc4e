"""Long SFT data: one sample per row, prompt tokens labelled -100.

LongAlpaca records (instruction, optional input, output) use the Alpaca prompt:
`[bos] prompt` is masked, `output [eos]` is learned. Chat records (`messages`) are rendered
with the tokenizer's chat template; the tokens of every assistant turn (its content and the
template's end-of-turn tokens) are learned, everything else is masked. The assistant spans are
found by rendering the conversation up to each turn (with and without the turn), so the
template must render a conversation as a prefix of any longer one; a template that does not is
reported, not guessed at.

A sample longer than `seq_length` is dropped (`data.overlong: drop`, reason `overlong`) or cut
to `seq_length` (`truncate`); a cut sample with no learned token left is dropped and counted
(`response_truncated`). A sample whose response is empty is dropped (`empty_response`).
"""

from __future__ import annotations

import json

PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
IGNORE = -100


def alpaca_prompt(instruction: str, input: str) -> str:
    if input.strip():
        return PROMPT_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def _encode(tokenizer, text: str, split_special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=False, split_special_tokens=split_special)["input_ids"]


def encode_alpaca(tokenizer, instruction: str, input: str, output: str) -> tuple[list[int], list[int]]:
    prompt = _encode(tokenizer, alpaca_prompt(instruction, input), True)
    if tokenizer.bos_token_id is not None:
        prompt = [tokenizer.bos_token_id] + prompt
    response = _encode(tokenizer, output, True)
    if tokenizer.eos_token_id is not None:
        response = response + [tokenizer.eos_token_id]
    return prompt + response, [IGNORE] * len(prompt) + response


def encode_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Raises ValueError when the template does not render conversations prefix-consistently."""

    def render(msgs, gen):
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        return _encode(tokenizer, text, False)

    ids = render(messages, False)
    labels = [IGNORE] * len(ids)
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render_prefix(render, messages[:k])
        upto = render(messages[: k + 1], False)
        if ids[: len(upto)] != upto or upto[: len(before)] != before:
            raise ValueError(
                f"the chat template does not render the conversation up to message {k} as a prefix "
                "of the whole, so the assistant tokens cannot be located"
            )
        labels[len(before) : len(upto)] = ids[len(before) : len(upto)]
    return ids, labels


def _render_prefix(render, msgs):
    """The conversation before an assistant turn, with the generation prompt that opens the turn."""
    if msgs:
        return render(msgs, True)
    from jinja2 import TemplateError

    try:  # an assistant turn first: some templates cannot render an empty conversation
        return render([], True)
    except (TemplateError, IndexError, KeyError, TypeError, ValueError):
        return []


def tokenize_samples(ds, tokenizer, data, seq_length: int, num_proc: int, cache_file: str):
    """Adds `input_ids`, `labels`, `n` and `status` ('' = kept, else the skip reason) and `error`."""
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__

    def one(instruction, input, output, messages):
        if messages:
            if not getattr(tokenizer, "chat_template", None):
                raise ValueError(
                    f"tokenizer '{name}' has no chat template, which chat records (messages) need"
                )
            msgs = json.loads(messages)
            ids, labels = encode_chat(tokenizer, msgs)
            empty = all(not m["content"].strip() for m in msgs if m["role"] == "assistant")
        else:
            ids, labels = encode_alpaca(tokenizer, instruction, input, output)
            empty = not output.strip()
        if empty:
            return ids, labels, "empty_response"
        if len(ids) > seq_length:
            if data.overlong == "drop":
                return ids, labels, "overlong"
            ids, labels = ids[:seq_length], labels[:seq_length]
            if all(x == IGNORE for x in labels):
                return ids, labels, "response_truncated"
        return ids, labels, ""

    def fn(batch):
        out = {"input_ids": [], "labels": [], "n": [], "status": [], "error": []}
        for i in range(len(batch["_where"])):
            try:
                ids, labels, status = one(
                    batch["instruction"][i], batch["input"][i], batch["output"][i], batch["messages"][i]
                )
                err = ""
            except ValueError as e:  # reported with the record's location once the map is done
                ids, labels, status, err = [], [], "error", f"{batch['_where'][i]}: {e}"
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["n"].append(len(ids))
            out["status"].append(status)
            out["error"].append(err)
        return out

    return ds.map(
        fn,
        batched=True,
        batch_size=64,
        num_proc=num_proc if num_proc > 1 and len(ds) > 1 else None,
        remove_columns=["instruction", "input", "output", "messages"],
        cache_file_name=cache_file,
        desc="tokenizing",
    )
