"""`make bench` (`python experiments/bench/run.py`): how fast and how lean segldm is, against the reference.

Not timed tests: a measurement suite. Every section runs the same function two or more ways on one
model instance, interleaving the ways round by round on the same machine, and reports medians and
per-round ratios next to the machine's description and load (the CPU box this project runs on is
shared, so absolute figures move and only ratios measured together mean anything).

* :mod:`.modes`: segldm's defaults (fp32: the anchor of the ratios; bf16 where native), each default
  switched back to the CompVis code's way alone (``-x``) and each opt-in switched on (``+x``).
* :mod:`.reference`, :mod:`.workers`: against the real CompVis code, each side in its own process
  (the scripts ``segldm_worker.py`` and ``compvis_worker.py`` beside this package).
* :mod:`.measure`: interleaved timing, peak memory (CPU: the profiler's allocator events; CUDA: the
  caching allocator's peak), FLOP counting.
* :mod:`.machine`: CPU/GPU description, bf16 support, the GPU's bf16 peak for model FLOP utilisation.
* :mod:`.suite`: the sections (training step, first stage, sampler, data loading, evaluation) and the
  results files (``results.json``, ``results.md``).

It lives in ``experiments/bench/``, beside its results and outside the installed package (as diffusers
and PyTorch keep their benchmarks out of the library): it imports segldm, segldm never imports it.
"""
