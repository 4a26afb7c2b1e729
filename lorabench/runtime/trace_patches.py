"""What the tracer patches while it runs (:mod:`lorabench.runtime.trace`): transformers' packed-sequence test,
the kernels a CUDA run takes where they differ from the CPU's (NF4 dequantization, dropout), lorabench's NF4
constants under fake tensors, and torch's fake-tensor error log."""

from __future__ import annotations

import contextlib
import itertools
import logging
import sys
from typing import Any, Iterator

import torch
from torch._subclasses.fake_tensor import is_fake

@contextlib.contextmanager
def quiet_fake_tensor_log() -> Iterator[None]:
    """torch logs every op that fails under fake tensors, traceback and all, before raising; the tracer turns
    the error into one line, so that log is silenced while it runs."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def unpacked_batches_under_fake() -> Iterator[None]:
    """Make transformers take the real-tensor mask path for fake inputs.

    ``masking_utils.find_packed_sequence_indices`` decides whether ``position_ids`` hold several packed
    sequences by reading tensor values, which it skips for fake tensors ("tracing") and then assumes packing:
    it would build a (b, 1, s, s) mask and sdpa would lose ``is_causal``. The traced batch is one sequence
    per row (positions 0..s-1), for which real tensors get ``None`` (no mask). Under fake tensors this runs the
    same ops (so the allocations match a real run) and returns that ``None``.
    """
    try:
        from transformers import masking_utils
    except ImportError:  # older transformers: no packed-sequence detection to work around
        yield
        return
    original = getattr(masking_utils, "find_packed_sequence_indices", None)
    if original is None:
        yield
        return

    def unpacked(position_ids: torch.Tensor) -> torch.Tensor | None:
        if not is_fake(position_ids):
            return original(position_ids)
        packed_sequence_mask = original(position_ids)
        if packed_sequence_mask is not None:
            (packed_sequence_mask[:, -1] == 0).all()  # the value check a real tensor runs (and passes)
        return None

    masking_utils.find_packed_sequence_indices = unpacked
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = original


def dequant_as_on_cuda() -> contextlib.AbstractContextManager[None]:
    """lorabench 4-bit layers with ``dequant=auto`` take the CUDA choice (the Triton op) in fake and real traces.

    The op's fake kernel allocates only its output, as the Triton kernel does; on real CPU tensors the op
    computes inside itself, where the tracker does not look, so fake and real traces agree.
    """
    linear4bit = sys.modules.get("lorabench.quant.linear4bit")  # imported by the qlora runtime
    return contextlib.nullcontext() if linear4bit is None else linear4bit.dequant_as_on_cuda()


@contextlib.contextmanager
def cuda_dropout() -> Iterator[None]:
    """Dropout as CUDA runs it: ``torch.native_dropout``, whose backward keeps a bool mask.

    On the CPU, ``F.dropout`` of a tensor that requires grad draws a mask in the input's dtype
    (``empty_like(input).bernoulli_``) and multiplies, so autograd keeps a 4-byte mask per fp32 element; the
    CUDA kernel (``native_dropout``, used whenever the input is on CUDA) keeps a 1-byte bool mask. The trace
    reproduces a CUDA run, as with ``foreach`` AdamW (docs/SOURCES.md#cuda-dropout).
    """
    original = torch.nn.functional.dropout

    def native(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
        if not training or p == 0:
            return input
        return torch.native_dropout(input, p, True)[0]

    torch.nn.functional.dropout = native
    try:
        yield
    finally:
        torch.nn.functional.dropout = original


@contextlib.contextmanager
def nf4_for_tracing() -> Iterator[None]:
    """Trace lorabench's NF4 layers as a real run allocates, in a fraction of the ops. Enter inside fake mode.

    1. Shared constants once: a real run caches the NF4 codebook and dynamic map (~6 KB) per device when
       the model is quantized at build time, so the tracker never sees them; under fake tensors
       ``lorabench.quant.nf4`` rebuilds them at every dequantization (so that real and fake never mix),
       which would add short-lived activations. Here they are built once, before tracking, and reused.
    2. Two chunks only: ``dequantize_nf4`` fills its output in chunks of ``CHUNK_ELEMS`` elements; a chunk's
       temporaries stay bound to the loop variables until the next chunk's replace them, so at every moment
       of chunk k >= 2 the live bytes are chunk k's plus chunk k-1's temporaries: the same for every full
       chunk, more than the shorter last one. Tracing the first two chunks therefore gives the same peak and
       the same live set afterwards, with a fraction of the ops (a 70B QLoRA trace would otherwise run
       ~10^6 chunk ops). Weights of one or two chunks are unchanged.
    """
    nf4 = sys.modules.get("lorabench.quant.nf4")  # imported by the qlora runtime; nothing to do otherwise
    if nf4 is None:
        yield
        return
    constants, chunks = nf4._constants, nf4._chunks
    cache: dict[torch.device, Any] = {}

    def constants_once(device: torch.device) -> Any:
        if device not in cache:
            cache[device] = constants(device)
        return cache[device]

    def two_chunks(numel: int, blocksize: int) -> Iterator[tuple[int, int, int, int]]:
        return itertools.islice(chunks(numel, blocksize), 2)

    constants_once(torch.device("cpu"))
    nf4._constants, nf4._chunks = constants_once, two_chunks
    try:
        yield
    finally:
        nf4._constants, nf4._chunks = constants, chunks
