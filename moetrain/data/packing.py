"""Packing tokenised documents into fixed-length training blocks.

Documents (each already followed by EOS) are concatenated in order and cut into blocks of
``seq_len + 1`` tokens (inputs = block[:-1], labels = block[1:]); the final partial block is dropped.
Each block keeps the domain of its first token, for per-domain losses and expert-routing analysis.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moetrain.data.errors import DataError


@dataclass
class PackedDataset:
    """In-memory packed blocks: ``blocks_NL`` int32 [N, seq_len + 1], ``domain_N`` int64 [N]."""

    blocks_NL: torch.Tensor
    domain_N: torch.Tensor
    domains: list[str]
    num_tokens: int  # before dropping the partial last block
    num_documents: int
    tokens_per_domain: dict[str, int]  # document tokens (incl. EOS) by the documents' own domain

    @property
    def seq_len(self) -> int:
        return self.blocks_NL.shape[1] - 1

    def __len__(self) -> int:
        return self.blocks_NL.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """(LongTensor[seq_len + 1], domain id)"""
        return self.blocks_NL[index].long(), int(self.domain_N[index])

    def get_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(LongTensor[B, seq_len + 1], LongTensor[B]) in one gather."""
        return self.blocks_NL[indices].long(), self.domain_N[indices]


def pack(
    token_ids: np.ndarray,
    doc_lengths: np.ndarray,
    doc_domains: np.ndarray,
    seq_len: int,
    domains: list[str],
    split: str = "train",
) -> PackedDataset:
    """Cut the concatenation ``token_ids`` (documents of ``doc_lengths``) into ``seq_len + 1`` blocks."""
    block = seq_len + 1
    total = int(token_ids.shape[0])
    n_blocks = total // block
    if n_blocks == 0:
        raise DataError(
            f"data.seq_len={seq_len} needs {block} tokens per block but the {split} split has only "
            f"{total} tokens; lower data.seq_len or use more data"
        )
    # A copy: arrow buffers are read-only, and we want one compact int32 array.
    blocks_NL = torch.from_numpy(token_ids[: n_blocks * block].astype(np.int32, copy=True)).view(
        n_blocks, block
    )
    # The document holding each block's first token: the first document whose end lies beyond it.
    doc_domains = np.asarray(doc_domains, dtype=np.int64)
    doc_ends = np.cumsum(doc_lengths)
    first_doc = np.searchsorted(doc_ends, np.arange(n_blocks) * block, side="right")
    domain_N = torch.from_numpy(doc_domains[first_doc])
    per_domain = np.bincount(doc_domains, weights=doc_lengths, minlength=len(domains)).astype(np.int64)
    return PackedDataset(
        blocks_NL,
        domain_N,
        domains,
        num_tokens=total,
        num_documents=len(doc_lengths),
        tokens_per_domain=dict(zip(domains, per_domain.tolist())),
    )
