"""The judge: metrics, budgets, verdicts, comparison (whole-model and lockstep), consistency, attribution."""
