"""dsf-runtime: run double-sparse-factorized LLMs sparsely."""
