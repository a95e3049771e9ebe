"""pufferfish/lab/check_plans.py's parts: which pairs share a job (grouping), the card the jobs see (cards),
running them (scheduler), reading their runs (rows) and the tables (report)."""
