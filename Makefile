# Two commands on a fresh machine (Rust toolchain + python3 present):
#   make demo   set up .venv, build the extension, run the demo
#   make test   add the reference stack (scanpy, scikit-learn), run the linters (ruff, clippy), Rust and Python tests
PY      := .venv/bin/python
comma   := ,
export VIRTUAL_ENV := $(CURDIR)/.venv
export PATH := $(CURDIR)/.venv/bin:$(PATH)

.PHONY: demo test build wheels docs bench-distributed bench-scale bench bench-kmeans bench-knn bench-metrics bench-integration bench-io bench-pipeline bench-tahoe bench-small bench-counts bench-rust

.venv/.base:
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $$(grep -E '^(maturin|polars|numpy|matplotlib)==' requirements-test.txt)
	touch $@

.venv/.test: .venv/.base requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

# make build CUDA=1: the extension with the CUDA backend (device="cuda"; needs
# no CUDA toolkit to build, a driver and CUDA 12.6+/13 libraries to run).
build: .venv/.base
	maturin develop --release --quiet $(if $(CUDA),--features python$(comma)cuda)

demo: build
	$(PY) -m polars_singlecell demo

# --features cuda: the CUDA code compiles in CI (no GPU there: the GPU half of
# each kernel test is skipped, with the reason printed). --features lazy: the
# Rust pipelines' prelude (linted apart from python: see Cargo.toml); the
# example it builds is compared with psc.integrate by
# tests/test_rust_pipeline.py (required here, skipped by a bare pytest
# without the build).
test: .venv/.test build
	$(PY) -m ruff check python tests benches examples
	cargo clippy --all-targets --features python,cuda --quiet -- -D warnings
	cargo clippy --all-targets --features cuda,lazy --quiet -- -D warnings
	RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --features cuda,lazy --quiet
	cargo test --quiet --features cuda,lazy
	cargo run --quiet --features cuda,lazy --example rust_pipeline
	PSC_REQUIRE_RUST_EXAMPLE=1 $(PY) -m pytest -q

# The abi3 wheel (one for every Python >= 3.10 of this platform) into target/wheels/; CI for
# Linux, macOS and Windows: .github/workflows/wheels.yml. `make wheels CUDA=1` adds the CUDA backend.
wheels: .venv/.base
	maturin build --release --out target/wheels $(if $(CUDA),--features python$(comma)cuda)

# The tables of docs/benchmarks.md, refilled from benches/results/ (run it after a bench;
# tests/test_docs.py fails while one differs from its file).
docs:
	python3 benches/render_docs.py

bench: .venv/.test build
	$(PY) benches/bench_preprocessing.py

bench-kmeans: .venv/.test build
	$(PY) benches/bench_kmeans.py

bench-knn: .venv/.test build
	$(PY) benches/bench_knn.py

bench-metrics: .venv/.test build
	$(PY) benches/bench_metrics.py

bench-integration: .venv/.test build
	$(PY) benches/bench_integration.py

bench-io: .venv/.test build
	$(PY) benches/bench_io.py

# Tahoe-100M's density and layouts: decode, to_cells, h5ad import, integrate; atlas extrapolation.
bench-tahoe: .venv/.test build
	$(PY) benches/bench_tahoe.py $(or $(N),200000)

bench-counts: .venv/.test build
	$(PY) benches/bench_counts.py

bench-pipeline: .venv/.test build
	$(PY) benches/bench_pipeline.py

bench-small: .venv/.test build
	$(PY) benches/bench_small.py

# The Rust pipeline (examples/rust_pipeline.rs, dev profile) beside psc.integrate: seconds, peak RSS, equal outputs.
bench-rust: .venv/.test build
	cargo build --quiet --features cuda,lazy --example rust_pipeline
	$(PY) benches/bench_rust_pipeline.py

# psc.integrate local against a 2-worker Dask LocalCluster (seconds, peaks, identical outputs).
bench-distributed: .venv/.test build
	$(PY) benches/bench_distributed.py $(or $(N),1000000)

# Tahoe-100M's size on N workers, on paper, from the measured rates (benches/results/*.json).
bench-scale: .venv/.test build
	$(PY) benches/scale_plan.py
