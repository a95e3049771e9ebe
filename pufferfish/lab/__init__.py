"""The lab: what measures and checks Pufferfish rather than trains with it.

Calibration (calibrate), the memory and speed models' fits (fit_memory_model, fit_speed_model), the plan
check (check_plans, plan_check/), the sweeps' measuring job and the tables made from it (measure,
sweep_tools, memory_table, speed_table) and from plans (card_table), benchmarks (bench, bench_throughput,
bench_ddp, bench_moe, budget_check) and quality_per_budget. Each runs as `python -m pufferfish.lab.<name>`.
The lab imports the product's public names; nothing outside pufferfish/lab/ imports the lab
(tests/test_lab.py checks both).
"""
