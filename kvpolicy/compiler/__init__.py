"""The compiler: Plan → KernelSpecs → Triton source rendered from codegen/*.py.jinja → artifact.

Rendering needs jinja2 only; loading and running the kernels needs torch and triton."""
