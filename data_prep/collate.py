"""Batching for the trainer: pad rows of a prepared dataset to the longest in the batch."""

from __future__ import annotations

from dataclasses import dataclass

IGNORE = -100


@dataclass
class DataCollator:
    """Pads `input_ids` (pad_token_id), `labels` (-100) and `position_ids`; builds `attention_mask`.

    Padding goes on the right. Padded positions continue counting from the row's last position,
    so they never look like a document start and never exceed the longest row's positions.
    Rows without `labels` get labels = input_ids; rows without `position_ids` get 0..len-1.
    """

    pad_token_id: int | None = 0
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict:
        import torch

        pad = 0 if self.pad_token_id is None else int(self.pad_token_id)
        lengths = [len(f["input_ids"]) for f in features]
        width = max(lengths)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": torch.full((len(features), width), pad, dtype=torch.long),
            "labels": torch.full((len(features), width), IGNORE, dtype=torch.long),
            "position_ids": torch.zeros((len(features), width), dtype=torch.long),
            "attention_mask": torch.zeros((len(features), width), dtype=torch.long),
        }
        for i, (f, n) in enumerate(zip(features, lengths)):
            ids = torch.as_tensor(f["input_ids"], dtype=torch.long)
            labels = torch.as_tensor(f["labels"], dtype=torch.long) if "labels" in f else ids
            pos = (
                torch.as_tensor(f["position_ids"], dtype=torch.long)
                if "position_ids" in f
                else torch.arange(n, dtype=torch.long)
            )
            batch["input_ids"][i, :n] = ids
            batch["labels"][i, :n] = labels
            batch["position_ids"][i, :n] = pos
            batch["position_ids"][i, n:] = torch.arange(1, width - n + 1) + (pos[-1] if n else -1)
            batch["attention_mask"][i, :n] = 1
        return batch
