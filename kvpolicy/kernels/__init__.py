"""The kernels' room: the living spec (`reference`, plain PyTorch), the launchers of the generated
Triton kernels (`launch`), the C kernels' build and calls for CPU engines (`cpu`), the input
contracts they share (`contract`: the whole-prompt decode kernel's `compressed.CompressedLayer`,
source dtypes, mass reductions), and a loaded artifact's kernels bound to a layer (`bound`).
Every kernel is tested against one reference. Imports torch; never an engine or the store."""
