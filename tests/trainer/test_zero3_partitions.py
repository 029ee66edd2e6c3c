"""ZeRO-3 partition writes (checkpoint/zero3_state.py): each rank's padded slice of a full tensor."""

from __future__ import annotations

import torch

from moetrain.checkpoint.zero3_state import partition_slice


def test_partition_slices_cover_the_tensor_and_pad_the_last_rank_with_zeros():
    value = torch.arange(1.0, 8.0).reshape(7, 1)  # 7 elements over 2 ranks: partitions of 4
    first, last = partition_slice(value, 4, 0), partition_slice(value, 4, 1)
    assert first.tolist() == [1.0, 2.0, 3.0, 4.0]
    assert last.tolist() == [5.0, 6.0, 7.0, 0.0]  # DeepSpeed's safe_set_full_* would slice past the end
    assert torch.equal(torch.cat([first, last])[:7], value.reshape(-1))
    even = torch.arange(6.0)
    assert partition_slice(even, 3, 1).data_ptr() == even[3:].data_ptr()  # no copy when nothing is padded
