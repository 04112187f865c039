"""`make bench` (`python -m segldm.benchmarks`): how fast and how lean segldm is, against the reference.

Not timed tests: a measurement suite. Every section runs the same function two or more ways on one
model instance, interleaving the ways round by round on the same machine, and reports medians and
per-round ratios next to the machine's description and load (the CPU box this project runs on is
shared, so absolute figures move and only ratios measured together mean anything).

* :mod:`.modes`: the *baseline* mode (the reference's choices: materialised einsum attention with the
  UNet attention blocks recomputed in backward, fp32, one-hot masks built by the data loader, frozen
  first stage under no_grad) and the optimised choices, one switch each.
* :mod:`.measure`: interleaved timing, peak memory (CPU: the profiler's allocator events; CUDA: the
  caching allocator's peak), FLOP counting.
* :mod:`.machine`: CPU/GPU description, bf16 support, the GPU's bf16 peak for model FLOP utilisation.
* :mod:`.suite`: the sections (training step, first stage, sampler, data loading, evaluation) and the
  results files (``results.json``, ``results.md``).
"""
