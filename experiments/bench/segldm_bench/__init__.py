"""`make bench` (`python -m segldm.benchmarks`): how fast and how lean segldm is, against the reference.

Not timed tests: a measurement suite. Every section runs the same function two or more ways on one
model instance, interleaving the ways round by round on the same machine, and reports medians and
per-round ratios next to the machine's description and load (the CPU box this project runs on is
shared, so absolute figures move and only ratios measured together mean anything).

* :mod:`.modes`: segldm's defaults (fp32: the anchor of the ratios; bf16 where native), each default
  switched back to the CompVis code's way alone (``-x``) and each opt-in switched on (``+x``).
* :mod:`.reference`, :mod:`.segldm_worker`, :mod:`.workers`: against the real CompVis code, each side
  in its own process (``experiments/bench/compvis_worker.py`` is the reference's side).
* :mod:`.measure`: interleaved timing, peak memory (CPU: the profiler's allocator events; CUDA: the
  caching allocator's peak), FLOP counting.
* :mod:`.machine`: CPU/GPU description, bf16 support, the GPU's bf16 peak for model FLOP utilisation.
* :mod:`.suite`: the sections (training step, first stage, sampler, data loading, evaluation) and the
  results files (``results.json``, ``results.md``).
"""
