"""GPU benchmarks and GPU correctness checks of the kernels (run by hand on a CUDA machine)."""
