"""The thinking budget on EleutherAI's lm-evaluation-harness: the `nanokit` model for lm-eval
(`model.py`), `nanokit eval` (`run.py`, `cli.py`: scores at several budgets, a table and a plot),
and tasks written as lm-eval task files (`tasks/`: nano-tiny's arithmetic)."""
