"""Pallas GPU kernels, each beside its plain jax.numpy reference.

* `kernels.row_lse`: fused row log-sum-exp of Q K^T and its backward, the
  normaliser of CoRE's mobility loss, in O(N) memory.
* `kernels.biased_attention`: flash attention with a spatial bias computed
  inside the kernel from per-node coordinates (ToPT's Graphormer fusion).
* `kernels.peaks` and `kernels.timing`: the boards' peak throughputs and
  the timing of the benchmarks' `main()`.

Each public function picks the Pallas kernel on a GPU and the reference
elsewhere, with an explicit override; the kernels' numerics are tested on the
CPU in Pallas interpret mode.
"""
