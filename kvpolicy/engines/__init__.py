"""The engines a compiled policy runs in: Hugging Face transformers (`hf`: the whole-prompt
runtime's cache and the paged cache over kvpolicy.store) and vLLM (`vllm`: the plugin whose
backend runs kvpolicy.store). Engines never import each other (tests/test_house_rules.py)."""
