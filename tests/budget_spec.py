"""The budget rule written the obvious way: `nano.budget.BudgetRow`, one row in plain Python.

`nano.budget.BudgetController` (tensors, whole batch, no branches) must match it token for token
(tests/test_budget_properties.py). Read the docstring of `nano/budget.py` for the rule in words.
"""

from nano.budget import BudgetRow as SpecRow

__all__ = ["SpecRow"]
