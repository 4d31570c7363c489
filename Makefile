# The README's two commands: `make run` and `make test`.
PYTHON ?= python3
# where torch comes from: empty for pip's own configuration (these build machines keep the
# CPU build of 2.13.0 locally); elsewhere e.g. https://download.pytorch.org/whl/cpu, since
# PyPI's Linux wheel is the CUDA build
TORCH_INDEX ?=
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test lint typecheck bench-quality clean system-tools images

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned, so that installing the project pulls no other build of it
	$(BIN)/python -m pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

# Builds the demo model if missing, segments a shifted phantom, then serves the API in
# embedded mode (no Redis) on 127.0.0.1 and prints the /docs URL and a ready curl line.
run: $(STAMP)
	$(BIN)/sitefit demo
	$(BIN)/sitefit serve

# The integration tests start a private redis-server and Orthanc (with its DICOMweb plugin),
# send with dcmtk and validate SEGs with dicom3tools; the deploy tests validate docker-compose.yml
# and the Prometheus config (promtool comes with Debian's prometheus); the web page's tests
# drive Debian's chromium with its chromedriver: install what is missing.
SYSTEM_TOOLS := redis-server:redis-server Orthanc:orthanc \
	/usr/share/orthanc/plugins/libOrthancDicomWeb.so:orthanc-dicomweb storescu:dcmtk \
	dciodvfy:dicom3tools docker-compose:docker-compose promtool:prometheus \
	chromium:chromium chromedriver:chromium-driver
system-tools:
	@missing=""; for pair in $(SYSTEM_TOOLS); do tool=$${pair%%:*}; package=$${pair#*:}; \
		{ command -v $$tool >/dev/null 2>&1 || test -e $$tool; } || missing="$$missing $$package"; \
	done; if [ -n "$$missing" ]; then $(SUDO) apt-get update -q && \
		$(SUDO) apt-get install -y -q --no-install-recommends $$missing; fi

# pytest exits 5 when it collects no tests: make treats any non-zero exit as failure.
test: $(STAMP) system-tools
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# Builds the API and worker images with podman from a local Debian base (no registry needed)
# and smoke-tests them inside with buildah (docker/build_images.py). Not part of `make test`.
images: $(STAMP)
	@missing=""; for tool in podman buildah mmdebstrap redis-server; do \
		command -v $$tool >/dev/null 2>&1 || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then $(SUDO) apt-get update -q && \
		$(SUDO) apt-get install -y -q $$missing; fi
	$(BIN)/python docker/build_images.py $(if $(TORCH_INDEX),--torch-index $(TORCH_INDEX))

bench-quality: $(STAMP)
	$(BIN)/python bench/adapt_quality.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
