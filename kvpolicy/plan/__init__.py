"""Planning: per-layer budgets and storage for a model and a context, with exact byte counts."""
