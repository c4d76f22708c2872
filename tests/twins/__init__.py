"""The slow, obvious twins that the fast paths are held to in the tests, and used nowhere else:
the sequential Mamba2 scan (`scan`), the importance passes through transformers' forward
(`importance`), a DeciLM forward written loop by loop (`decilm`). The budget rule's plain-Python
twin, `nano.budget.BudgetRow`, stays in the core: the TensorRT-LLM processor runs it."""
