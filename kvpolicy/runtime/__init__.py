"""Running policies: the PyTorch reference (the spec), the compressed-layer container, launchers
for the compiled kernels. Imports torch."""
