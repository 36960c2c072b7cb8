"""The search: pure rules (grid, refinement, pass test, objectives, Pareto front), the one-shot
and iterative walks over candidates, and the journal that lets a killed search resume."""
