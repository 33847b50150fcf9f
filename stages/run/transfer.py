"""Host <-> device transfers of activation batches without a host sync per batch.

`device_batches` puts each batch of an iterable on the compute device. On a CUDA device it
stages the batch in pinned host memory and copies it on a side stream one batch ahead, so
the copy of batch k+1 runs while the GPU computes on batch k; the compute stream waits on
the copy's event, not the host. `HostSink` brings a block's outputs back: on CUDA each
output is copied into pinned memory on a side stream and handed to its sink (a shard
writer, a slice of a tensor) once its copy has finished, which the host checks without
waiting (an event query) and waits for only when more than ``depth`` copies are in flight
or at `flush`. On a CPU both are plain pass-throughs, so every caller has one code path.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator

import torch


def _cuda(device: torch.device | str | None) -> torch.device | None:
    """The device if it is a CUDA one (with its index filled in), else None."""
    if device is None:
        return None
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)


def device_batches(batches: Iterable[torch.Tensor], device: torch.device | str | None) -> Iterator[torch.Tensor]:
    """Yield each batch on ``device`` (as is without one); on CUDA, prefetched one ahead from pinned memory.

    A yielded CUDA batch is safe to use on the current stream at once; it stays valid until the
    caller drops it, whatever the next iteration copies.
    """
    cuda = _cuda(device)
    if cuda is None:
        for x in batches:
            yield x if device is None else x.to(device)
        return
    side = torch.cuda.Stream(cuda)

    def issue(x: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
        host = x if x.is_pinned() else x.pin_memory()  # a memory-mapped shard is pageable: one host copy
        with torch.cuda.stream(side):
            on_device = host.to(cuda, non_blocking=True)
            done = torch.cuda.Event()
            done.record(side)
        return on_device, done

    ahead: tuple[torch.Tensor, torch.cuda.Event] | None = None
    for x in batches:
        nxt = issue(x)
        if ahead is not None:
            yield _ready(*ahead, cuda)
        ahead = nxt
    if ahead is not None:
        yield _ready(*ahead, cuda)


def _ready(x: torch.Tensor, done: torch.cuda.Event, cuda: torch.device) -> torch.Tensor:
    """``x``, copied on the side stream, made usable on the current stream (which waits on ``done``)."""
    stream = torch.cuda.current_stream(cuda)
    stream.wait_event(done)
    x.record_stream(stream)  # its memory is not reused by the side stream's allocator until this stream is past it
    return x


class HostSink:
    """Hand device tensors to ``sink`` as CPU tensors, in order, without a host sync per tensor.

    Call it with each output, then `flush` (or use it as a context manager: a clean exit
    flushes). On CUDA at most ``depth`` copies are in flight before the oldest is waited for.
    The CPU tensors given to ``sink`` are fresh pinned buffers (CUDA) or the caller's tensor
    detached (CPU): ``sink`` may keep them.
    """

    def __init__(self, sink: Callable[[torch.Tensor], None], depth: int = 4) -> None:
        self.sink = sink
        self.depth = depth
        self._inflight: deque[tuple[torch.Tensor, torch.cuda.Event]] = deque()
        self._side: dict[torch.device, torch.cuda.Stream] = {}

    def __call__(self, y: torch.Tensor) -> None:
        y = y.detach()
        if y.device.type != "cuda":
            self.sink(y.to("cpu"))
            return
        side = self._side.setdefault(y.device, torch.cuda.Stream(y.device))
        side.wait_stream(torch.cuda.current_stream(y.device))  # y is computed
        host = torch.empty(y.shape, dtype=y.dtype, pin_memory=True)
        with torch.cuda.stream(side):
            host.copy_(y, non_blocking=True)
            done = torch.cuda.Event()
            done.record(side)
        y.record_stream(side)
        self._inflight.append((host, done))
        self._drain(wait=len(self._inflight) > self.depth)

    def _drain(self, wait: bool) -> None:
        while self._inflight:
            host, done = self._inflight[0]
            if not done.query():
                if not wait:
                    return
                done.synchronize()
            self._inflight.popleft()
            self.sink(host)
            wait = len(self._inflight) > self.depth

    def flush(self) -> None:
        """Wait for every copy in flight and hand it to the sink."""
        while self._inflight:
            host, done = self._inflight.popleft()
            done.synchronize()
            self.sink(host)

    def __enter__(self) -> HostSink:
        return self

    def __exit__(self, exc_type: type | None, *rest: object) -> None:
        if exc_type is None:
            self.flush()
        else:
            self._inflight.clear()


def rows_into(out: torch.Tensor) -> Callable[[torch.Tensor], None]:
    """A sink that writes successive batches into ``out``'s rows, from row 0 on."""
    at = [0]

    def write(y: torch.Tensor) -> None:
        out[at[0] : at[0] + len(y)] = y
        at[0] += len(y)

    return write
