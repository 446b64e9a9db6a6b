"""The paged store: a compiled policy's KV cache in pages, as plain functions of tensors,
engine-independent — vLLM's backend and the Hugging Face runtime's paged cache are adapters over
it (neither imports the other, and neither re-states a rule that lives here).

The page plan (`kvpolicy.plan.pages`) says which blocks are sealed and how many tokens each
sealed page keeps per KV head. Until a block seals, its tokens live at full precision in a
staging buffer (`staging.StagingTable` decides which slot). The store's rules:
- importance (snapkv): the attention mass a staged token receives from the last `observe`
  queries of every step that sees it (a prompt prefilled in one step: SnapKV's observation
  window), reduced over the query heads of its KV group as the policy says, pooled when its
  block seals (`kernels.reference.reduce_then_pool`'s order); keynorm and recent need no mass;
- selection (`store.select`, the whole-prompt runtime's rule too): the blocks a request seals in
  one step are selected *together*: their tokens are pooled (snapkv) and ranked as one span, the
  `selected x g` most important kept (ties: the earlier token), the most important
  `guard_tokens x g` of those are guards; guards and body tokens are packed densely in position
  order into the g pages, each page holding its plan's count. A needle's block can keep more
  than its share; the bytes are the per-block plan's;
- sealing happens after a step's queries have attended (their mass counts), and a request whose
  past holds a block sealed in this step attends again over the sealed pages.
Modules, in the order a step uses them: `staging` (slots), `views` (pages and staging buffers),
`seal` (write and seal), `read` (a chunk's past), `attend` (the PyTorch path's attention),
`step` (one engine step per layer, and the compiled path's launches). docs/vllm.md describes the
design and what it cannot do.
"""

# What an engine calls (vLLM's backend, the Hugging Face paged cache); the rest is the store's own.
from kvpolicy.store.paged.seal import seal_blocks
from kvpolicy.store.paged.step import StepMetadata, attend_step, step_metadata, write_step
from kvpolicy.store.paged.views import group_pages, layer_pages, new_staging

__all__ = ["StepMetadata", "attend_step", "group_pages", "layer_pages", "new_staging",
           "seal_blocks", "step_metadata", "write_step"]
