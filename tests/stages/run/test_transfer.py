"""Batches to the device and outputs back (`stages.run.transfer`), on the `device` fixture's device (the CPU,
or a GPU under benchmarks/gpu_check.sh)."""

import pytest
import torch

from stages.run.shards import ShardWriter, read_shards
from stages.run.transfer import HostSink, device_batches, rows_into

pytestmark = pytest.mark.device


def _batches(n: int, rows: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    return [torch.randn(rows, 5, 4, generator=g) for _ in range(n)]


@pytest.mark.parametrize("n", [0, 1, 2, 7])
def test_device_batches_yields_every_batch_in_order_on_the_device(device, n):
    batches = _batches(n)
    got = list(device_batches(iter(batches), device))
    assert len(got) == n
    for a, b in zip(got, batches, strict=True):
        assert a.device.type == torch.device(device).type
        assert torch.equal(a.cpu(), b)


def test_device_batches_without_a_device_passes_the_tensors_through():
    batches = _batches(3)
    assert all(a is b for a, b in zip(device_batches(batches, None), batches, strict=True))


def test_device_batches_copies_each_source_before_the_next_is_computed_on(device):
    """A prefetched batch is read before the consumer overwrites earlier rows (the evaluation's in-place
    update): every yielded batch holds its source's values at the time it was read."""
    hidden = torch.arange(24.0).reshape(6, 4)
    want = hidden.clone()
    with HostSink(rows_into(hidden)) as outputs:
        for x in device_batches((hidden[j : j + 2] for j in range(0, 6, 2)), device):
            outputs(x * 10)
    assert torch.equal(hidden, want * 10)


@pytest.mark.parametrize("depth", [1, 4])
def test_host_sink_hands_over_every_output_in_order_on_the_host(device, depth):
    got: list[torch.Tensor] = []
    sink = HostSink(got.append, depth=depth)
    batches = _batches(9)
    for b in batches:
        sink(b.to(device) + 1)
        assert len(sink._inflight) <= depth
    sink.flush()
    assert len(got) == 9
    for a, b in zip(got, batches, strict=True):
        assert a.device.type == "cpu" and torch.equal(a, b + 1)


def test_host_sink_drops_what_is_in_flight_when_its_block_raises(device):
    got: list[torch.Tensor] = []
    with pytest.raises(RuntimeError, match="boom"):
        with HostSink(got.append, depth=100) as sink:
            sink(torch.ones(2, device=device))
            raise RuntimeError("boom")
    assert not sink._inflight
    # on the CPU the output went to the sink at once; on a GPU only if its copy had finished already
    assert len(got) == 1 if device == "cpu" else len(got) <= 1


def test_shard_writer_takes_device_batches_and_writes_them_as_given(device, tmp_path):
    batches = _batches(5, rows=3)
    with ShardWriter(tmp_path / "acts", torch.float32, (5, 4), samples_per_shard=4) as writer:
        for b in batches:
            writer.add(b.to(device))
    acts = read_shards(tmp_path / "acts")
    assert torch.equal(torch.stack(list(acts)), torch.cat(batches))


def test_rows_into_fills_successive_rows():
    out = torch.zeros(5, 2)
    write = rows_into(out)
    write(torch.ones(2, 2))
    write(torch.full((3, 2), 2.0))
    assert torch.equal(out, torch.tensor([[1.0, 1.0]] * 2 + [[2.0, 2.0]] * 3))
