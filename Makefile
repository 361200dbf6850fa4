# The two commands of the README. Each creates or reuses the environment (tools/setup_env.sh) first.
.PHONY: demo test lint env

env:
	@bash tools/setup_env.sh >/dev/null

demo:
	@PY=$$(bash tools/setup_env.sh) && $$PY tools/demo.py $(ARGS)

test:
	@PY=$$(bash tools/setup_env.sh) && $$PY -m ruff check peft_d2 tools tests configs setup.py && $$PY -m pytest -n 2 $(ARGS)

lint:
	@PY=$$(bash tools/setup_env.sh) && $$PY -m ruff check peft_d2 tools tests configs setup.py
