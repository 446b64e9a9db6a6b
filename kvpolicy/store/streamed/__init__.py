"""The stream store: a compiled policy's KV cache laid out by the stream plan
(`kvpolicy.plan.streams`), so that one request holds what the whole-prompt plan says at every
block size — engine-independent plain functions of tensors, like the page store
(`kvpolicy.store.paged`), whose staging it shares for the window's blocks.

A request's kept tokens leave the window as its blocks seal, join their stream's pending rows at
full precision, and pack, a micro-page at a time, into the request's own vLLM blocks at the
plan's addresses (`StreamPlan.addresses`): no block of its own, no page per block. The reference
is `kvpolicy.store.streams.StreamRequest` (one request, all layers); the tests hold this store to
it bit for bit.

Modules, in the order a step uses them: `table` (which chunks and slots hold what, once per
step), `buffers` (a layer's staging), `seal` (kept tokens into pending rows and micro-pages),
`past` (a request's past, for PyTorch or the compiled kernels), `step` (one step per layer).
"""

from kvpolicy.store.streamed.buffers import (LayerBuffers, LayerStreams, Staging, layer_streams,
                                             new_buffers, new_staging)
from kvpolicy.store.streamed.step import StreamStep, attend_layer, stream_step, write_layer
from kvpolicy.store.streamed.table import StreamTable

__all__ = ["LayerBuffers", "LayerStreams", "Staging", "StreamStep", "StreamTable",
           "attend_layer", "layer_streams", "new_buffers", "new_staging", "stream_step",
           "write_layer"]
