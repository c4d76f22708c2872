import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # the test helpers (scripted.py, budget_spec.py)
