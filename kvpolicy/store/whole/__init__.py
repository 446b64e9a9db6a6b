"""The whole-prompt runtime's policy semantics: a recorded prefill compressed per the Plan
(`compress`: importance, budgets, selection, guards, centroids) and attention over the compressed
layers in vectorized PyTorch (`dense`, the CPU path)."""
