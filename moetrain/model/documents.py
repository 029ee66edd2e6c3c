"""Packed documents that do not see each other (``data.document_masking``).

From per-token document ids ([B, T], as the data loader delivers them) the model builds, once per
forward, the positions (restarting at 0 with every document, as transformers does for packed
sequences given ``position_ids`` and flash-attention's varlen path does per ``cu_seqlens``) and one
boolean attention mask [B, 1, T, T]: causal, inside the same document, and within the sliding window
if the model has one. Every layer's SDPA takes that mask (models/attention.py); nothing else in the
model changes: MoE routing and the fused LM loss are per token.
"""

from __future__ import annotations

import torch


def document_positions(document_ids_BT: torch.Tensor) -> torch.Tensor:
    """Each token's position inside its document: 0, 1, ... restarting where the id changes."""
    B, T = document_ids_BT.shape
    index_BT = torch.arange(T, device=document_ids_BT.device).expand(B, T)
    starts_BT = torch.ones_like(document_ids_BT, dtype=torch.bool)
    starts_BT[:, 1:] = document_ids_BT[:, 1:] != document_ids_BT[:, :-1]
    first_BT = torch.where(starts_BT, index_BT, 0).cummax(dim=1).values
    return index_BT - first_BT


def document_mask(document_ids_BT: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Boolean [B, 1, T, T], True = attend: key at or before the query, in the same document, and
    (with ``window``) fewer than ``window`` positions back. Every row keeps its own diagonal."""
    T = document_ids_BT.shape[1]
    pos = torch.arange(T, device=document_ids_BT.device)
    allowed_TT = pos[None, :] <= pos[:, None]
    if window is not None:
        allowed_TT = allowed_TT & (pos[None, :] > pos[:, None] - window)
    same_BTT = document_ids_BT[:, :, None] == document_ids_BT[:, None, :]
    return (same_BTT & allowed_TT).unsqueeze(1)
