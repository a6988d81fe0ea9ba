"""`flminillm bench`: performance (perf.py: micro.py, rounds.py, trl_compare.py) and quality
(quality.py: variants.py, baselines.py, quality_report.py) benchmarks; harness.py is shared."""
