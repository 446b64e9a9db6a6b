"""The compressed store: what a policy does to a KV cache, written once for both runtimes.

`select` is the one selection rule; `whole/` is the whole-prompt runtime (a recorded prefill
compressed at once per the Plan, attended in PyTorch or the compiled decode kernel); `paged/` is
the paged store both paged engines run (vLLM's backend, the Hugging Face paged cache): staging,
sealing, reading, attention, one step per layer. Imports kernels and the front end, never an
engine or its framework."""
