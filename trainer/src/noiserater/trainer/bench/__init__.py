"""The benchmarks as a library (`nrctl bench ...` are thin commands over it): the efficacy benchmark of
stage 2 and the serving load generator, ceiling and reports. Benchmarks write reports; no test asserts a
timing."""
