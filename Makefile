.PHONY: setup test demo bench
setup:
	bash scripts/setup_env.sh
test: setup
	.venv/bin/python -m pytest tests -q
demo: setup
	.venv/bin/python -m monet.demo
bench: setup
	.venv/bin/python -m pytest benchmarks -q --benchmark-json=benchmarks/results_ops.json
