"""Settings for the whole test session.

Inductor's on-disk cache of compiled graphs (the FX graph cache) keys a graph by its
operators, not by what their fake implementations return: a graph compiled against
another version of cpattn's operators (another branch on the same machine, or before
a change) comes back with that version's output layouts, and inductor's stride checks
then fail for code that is right. The suite compiles its graphs afresh; the compiled C++
kernels, cached by their source, are still reused.
"""
import torch._inductor.config

torch._inductor.config.fx_graph_cache = False
