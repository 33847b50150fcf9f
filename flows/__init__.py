"""Prefect flows that wire the stages, and the `sparsegpt` command line.

Importing this package (the CLI, a deployment's entrypoint) sets ``THP_MEM_ALLOC_ENABLE=1`` unless the
environment sets it already (then that value stands): torch's CPU allocator then page-aligns every
tensor of 2 MiB or more and advises it for transparent huge pages. torch reads the variable at its
first allocation, so it takes effect only where this package is imported before torch (the CLI and
deployments; child processes inherit it). Measured on SmolLM2-135M (`--sequential`, 32 x 512, Intel
Xeon, glibc 2.36): a block's anonymous growth 418 -> 277 MiB, the whole prune's peak 1144-1180 ->
1029-1058 MiB at the same speed (48.6-53.1 s against 50.8-53.1 s). The saving is the alignment's
(glibc's heap fragments less around the large tensors), not the huge pages': with THP disabled for
the process (prctl PR_SET_THP_DISABLE) the peak was the same 1029 MiB.
"""

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
