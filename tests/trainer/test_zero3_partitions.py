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


def _partitioned(shape: tuple[int, ...], n: int, rank: int) -> torch.nn.Parameter:
    """A stand-in for a ZeRO-3 parameter: the attributes DeepSpeed gives one (partition_parameters.py)."""
    p = torch.nn.Parameter(torch.empty(0))
    p.ds_id, p.ds_shape, p.ds_tensor, p.ds_zero_partition_rank = 0, torch.Size(shape), torch.zeros(n), rank
    return p


def test_partition_writer_keeps_this_ranks_elements_of_every_write():
    from moetrain.distributed.zero3 import PartitionWriter

    full = torch.arange(1.0, 16.0).reshape(3, 5)  # 15 elements over 2 ranks: partitions of 8
    for rank in (0, 1):
        p = _partitioned((3, 5), 8, rank)
        w = PartitionWriter(p)
        assert w.shape == (3, 5) and w.dtype == torch.float32
        w.copy_(full)
        assert torch.equal(p.ds_tensor, partition_slice(full, 8, rank))
        w[1].copy_(torch.full((5,), -1.0))  # row 1 = elements 5..9: both ranks hold a part of it
        w[2].add_(torch.ones(5))
        want = full.clone()
        want[1], want[2] = -1.0, want[2] + 1
        assert torch.equal(p.ds_tensor, partition_slice(want, 8, rank)), rank
    # negative control: a writer that ignored the rank would fill rank 1 with rank 0's elements
    p = _partitioned((3, 5), 8, 1)
    PartitionWriter(p).copy_(full)
    assert not torch.equal(p.ds_tensor, partition_slice(full, 8, 0))


def test_shard_stream_writes_a_safetensors_file_and_reports_a_wrong_tensor(tmp_path):
    import pytest
    from safetensors.torch import load_file

    from moetrain.checkpoint.shards import ShardStream, write_shard

    tensors = [("a", torch.arange(6.0).reshape(2, 3)), ("step/a", torch.tensor(3.0)), ("b", torch.ones(4))]
    entries = [(n, t.dtype, tuple(t.shape)) for n, t in tensors]
    stream = ShardStream(tmp_path / "s.safetensors", entries, {"format": "pt"})
    for name, t in tensors:
        stream.write(name, t)
    w = stream.close()
    whole = write_shard(tmp_path / "w.safetensors", tensors, {"format": "pt"})
    assert (w.bytes, w.sha256, w.names) == (whole.bytes, whole.sha256, whole.names)
    assert (tmp_path / "s.safetensors").read_bytes() == (tmp_path / "w.safetensors").read_bytes()
    back = load_file(str(tmp_path / "s.safetensors"))
    assert all(torch.equal(back[n], t) for n, t in tensors)
    bad = ShardStream(tmp_path / "bad.safetensors", entries, {"format": "pt"})
    bad.write("a", torch.zeros(3, 2))  # not the announced shape: kept as the error, later writes dropped
    bad.write("step/a", torch.tensor(3.0))
    with pytest.raises(ValueError, match="where the header has"):
        bad.close()
    short = ShardStream(tmp_path / "short.safetensors", entries, {"format": "pt"})
    short.write("a", tensors[0][1])
    with pytest.raises(ValueError, match="before its last tensor"):
        short.close()
