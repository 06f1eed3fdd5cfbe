"""Prompts: JSONL loading, chat templates, batching with left padding, train/val splits."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Batch:
    """A left-padded batch of encoded prompts.

    input_ids: [B, T] long; attention_mask: [B, T] (0 on padding); position_ids: [B, T] real token
    positions (cumsum of the mask - 1, 0 on padding) so absolute-position models give the same
    output padded or not; decision: [B] index (into T) of each prompt's last content token (never
    pad, EOS or chat-template tail); ids: prompt ids.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    decision: torch.Tensor
    ids: list = field(default_factory=list)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device),
                     self.position_ids.to(device), self.decision.to(device), list(self.ids))

    def model_inputs(self) -> dict:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "position_ids": self.position_ids}
