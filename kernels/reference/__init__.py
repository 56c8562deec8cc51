"""Plain-torch references of every kernel in ``mm1_moe.kernels``: the oracle of the tests and
the baseline of the benchmarks. One module per op, re-exported here."""
