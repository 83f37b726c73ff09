"""Triton kernels of the compact scorer: the attention over a sequence's few positions
(``attention``) and the log-sum-exp of materialised logits (``unembed_lse``); shared settings in
``common``. On CUDA they run compiled; elsewhere only under Triton's interpreter (the tests)."""
