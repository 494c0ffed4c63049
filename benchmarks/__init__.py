"""Benchmarks for alignDRAW: throughput against a naive reference, and a per-op profile.

Scripts (run from the repository root):
    python benchmarks/throughput.py --preset mnist-captions   training/sampling images/s
    python benchmarks/profile_step.py --preset mnist-captions  top ops and op counts per step
    python benchmarks/scaling.py                               cost against batch, T and canvas
    python benchmarks/ab_trees.py --a TREE --b TREE            one change, A/B in two processes
    python benchmarks/gemm.py                                  the model's products, MKL vs oneDNN
    python benchmarks/subnormals.py                            subnormal values per op, their cost

The small "which form is faster" benchmarks (``alignment_scores``, ``filterbank_exp``,
``context_mix``) time equal forms of one computation through ``forms``.

``data_parallel`` runs a variant in N worker processes of one thread each (``throughput.py
--processes N``), as the trainer runs under ``torchrun``. ``naive_reference`` holds the plain
per-step implementation that the throughput ratios and the equivalence tests
(``tests/test_benchmarks.py``) compare the library model with; ``flops`` counts matmul FLOPs
per image from a config; ``machine`` times calls, measures the matmul peak and how busy other
processes kept the machine.
"""
