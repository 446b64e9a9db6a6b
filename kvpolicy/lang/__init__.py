"""The policy language: source → AST → checked IR, and the canonical formatter."""
