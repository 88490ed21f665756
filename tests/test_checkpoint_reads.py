"""How tensors stream out of a safetensors file: large ones as private maps of their bytes
(no open file kept, unmapped when dropped, writes never reach the file), small or
misaligned ones as plain reads, a truncated file as a one-line error, never a crash."""

from __future__ import annotations

import gc
import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

from vlmcli.checkpoint import WeightFiles, iter_tensors
from vlmcli.errors import CheckpointError


def _tensors():
    gen = torch.Generator().manual_seed(0)
    return {
        "big.f32": torch.randn(512, 1024, generator=gen),  # 2 MiB: mapped
        "big.bf16": torch.randn(1024, 1024, generator=gen).bfloat16(),  # 2 MiB: mapped
        "small.f32": torch.randn(7, 5, generator=gen),  # read
    }


def _maps_of(path) -> int:
    with open("/proc/self/maps") as f:
        return sum(str(path) in line for line in f)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_large_tensors_are_maps_that_hold_no_file_open_and_go_when_dropped(tmp_path):
    path = tmp_path / "model.safetensors"
    expected = _tensors()
    save_file(expected, str(path))
    before = _open_fds()
    got = dict(iter_tensors(WeightFiles([path])))
    assert _open_fds() == before  # hundreds of kept tensors must not mean hundreds of open files
    assert _maps_of(path) == 2  # the two large tensors, each its own map
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor)
    got["big.f32"][0, 0] = 123.0  # copy-on-write: the file keeps its bytes
    assert torch.equal(dict(iter_tensors(WeightFiles([path])))["big.f32"], expected["big.f32"])
    gc.collect()
    assert _maps_of(path) == 2
    view = got["big.bf16"][3]  # a view keeps its map alive
    del got
    gc.collect()
    assert _maps_of(path) == 1 and torch.equal(view, expected["big.bf16"][3])
    del view
    gc.collect()
    assert _maps_of(path) == 0


def test_misaligned_tensor_is_read_not_mapped(tmp_path):
    """safetensors does not promise that a tensor's bytes start at a multiple of its
    element size; such a tensor is read into memory of its own."""
    path = tmp_path / "model.safetensors"
    values = torch.arange(512 * 1024, dtype=torch.float32).reshape(512, 1024)  # 2 MiB
    header = {
        "pad": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
        "w": {"dtype": "F32", "shape": [512, 1024], "data_offsets": [1, 1 + values.numel() * 4]},
    }
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\x07" + values.numpy().tobytes())
    got = dict(iter_tensors(WeightFiles([path])))
    assert got["pad"].tolist() == [7] and torch.equal(got["w"], values)
    assert _maps_of(path) == 0


def test_truncated_file_is_an_error_before_anything_is_mapped(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(_tensors(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])  # the last tensor in the file loses its end
    with pytest.raises(CheckpointError) as e:
        list(iter_tensors(WeightFiles([path])))
    assert str(e.value).startswith("model.safetensors is not a valid safetensors file (file ends inside '")
    assert "(truncated)" in str(e.value)
