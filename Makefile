.PHONY: setup test demo bench
setup:
	bash scripts/setup_env.sh
test: setup
	.venv/bin/python -m pytest tests -q
demo: setup
	.venv/bin/python -m monet.cli quickstart --out runs/quickstart
bench: setup
	.venv/bin/python -m pytest benchmarks -q
