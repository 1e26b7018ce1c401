# dit-blockskip: two commands on a fresh machine.
#   make demo   export the built-in tiny model and train a LoRA on device (offline)
#   make check  the fast tier (about 1 minute 10 s on 2 cores): units, formats and schemas, schedule, CLI errors, one
#               equivalence test per Python backend on the smallest model; run it before each commit
#   make test   run the test suite (builds the native runner and its C++ unit tests first, runs those with ctest)
#   make lint   ruff check, ruff format --check and mypy (what .ci/run runs before make test)
#   make native build the native ExecuTorch training runner into build/native
#   make native-aarch64   cross-build it for Linux aarch64 into build/native-aarch64 (needs Debian's
#               g++-aarch64-linux-gnu; the tests run it under qemu-aarch64 from qemu-user)
# Both create .venv and install what is missing (torch 2.13.0 CPU wheel from this disk).

PY      ?= python3.11
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
DEMO    ?= out/demo
NATIVE  ?= build/native
NATIVE_ARM ?= build/native-aarch64
ET_VERSION := 1.5.1
# the executorch wheel for Linux aarch64, unpacked (its libraries, headers and CMake package)
ET_ARM  ?= build/executorch-aarch64
DEMO_PROMPT ?= a photo of sks cat
# BlockSkip: 3 of the 9 blocks skipped as the selection table splits them; 64 px crops of 128 px photos
DEMO_PLAN ?= --skip-ratio 0.33 --rank 16 --samples 64 --steps 300 --lr 1e-3

.PHONY: demo test check lint venv clean native native-aarch64 stb

venv: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null || { echo "need $(PY) (Python 3.11)"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: a bare 'torch' requirement would pull a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[torch,test,dev,quant,ort,executorch,eval,data]'
	rm -f $(VENV)/.installed-* && touch $@

demo: venv
	$(BIN)/python -m bench.make_demo_images $(DEMO)/photos $(DEMO)/heldout
	$(BIN)/blockskip-export --model tiny --profile desktop-cpu --prompt "$(DEMO_PROMPT)" $(DEMO_PLAN) \
		-o $(DEMO)/bundle --force
	$(BIN)/device-train precompute $(DEMO)/bundle --images $(DEMO)/photos --cache $(DEMO)/run/cache
	$(BIN)/device-train train $(DEMO)/bundle --cache $(DEMO)/run/cache -o $(DEMO)/run
	$(BIN)/blockskip-eval --model tiny --lora $(DEMO)/run/lora.safetensors --views $(DEMO)/heldout \
		--prompt "$(DEMO_PROMPT)" --grid $(DEMO)/grid.png --json $(DEMO)/eval.json
	# the same personalisation on the phone path: ExecuTorch programs, block-streamed span, int8 weights
	$(BIN)/blockskip-export --model tiny --profile desktop-cpu --prompt "$(DEMO_PROMPT)" $(DEMO_PLAN) \
		--format pte --span streamed --storage int8 -o $(DEMO)/bundle-pte --force
	$(BIN)/device-train precompute $(DEMO)/bundle-pte --images $(DEMO)/photos --cache $(DEMO)/run-pte/cache \
		--backend executorch
	$(BIN)/device-train train $(DEMO)/bundle-pte --cache $(DEMO)/run-pte/cache -o $(DEMO)/run-pte --backend executorch
	$(BIN)/blockskip-eval --model tiny --lora $(DEMO)/run-pte/lora.safetensors --views $(DEMO)/heldout \
		--prompt "$(DEMO_PROMPT)" --grid $(DEMO)/grid-pte.png --json $(DEMO)/eval-pte.json
	$(BIN)/python -m bench.demo_report $(DEMO)

# the native runner (C++, links the ExecuTorch runtime shipped in the executorch wheel); CMake >= 3.28
# comes from pip into the venv, so the ExecuTorch package's imported targets are available
native: venv stb
	test -x $(BIN)/cmake || $(BIN)/pip install -q 'cmake>=3.28'
	$(BIN)/cmake -S . -B $(NATIVE) -DBLOCKSKIP_BUILD_NATIVE=ON -DPython3_EXECUTABLE=$(abspath $(BIN)/python)
	$(BIN)/cmake --build $(NATIVE) -j2

# the runner reads photos with stb_image (header-only, Debian's libstb-dev): installed here when missing
# and this is root on Debian (as .ci/run does); otherwise CMake says what to install
stb:
	@test -f /usr/include/stb/stb_image.h || ! command -v apt-get >/dev/null || [ "$$(id -u)" != 0 ] || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libstb-dev; }

# the same runner for Linux aarch64 (Jetson's OS; the CPU architecture of Android phones)
native-aarch64: venv stb $(ET_ARM)/executorch/lib
	@command -v aarch64-linux-gnu-g++ >/dev/null || { echo "need Debian's cross compiler: apt-get install g++-aarch64-linux-gnu qemu-user"; exit 1; }
	test -x $(BIN)/cmake || $(BIN)/pip install -q 'cmake>=3.28'
	$(BIN)/cmake -S . -B $(NATIVE_ARM) -DBLOCKSKIP_BUILD_NATIVE=ON \
		-DCMAKE_TOOLCHAIN_FILE=$(abspath cmake/aarch64-linux-gnu.cmake) -DEXECUTORCH_ROOT=$(abspath $(ET_ARM)/executorch)
	$(BIN)/cmake --build $(NATIVE_ARM) -j2

$(ET_ARM)/executorch/lib:
	rm -rf $(ET_ARM) && mkdir -p $(ET_ARM)/wheel
	$(BIN)/pip download -q --platform manylinux_2_28_aarch64 --only-binary=:all: --no-deps \
		executorch==$(ET_VERSION) -d $(ET_ARM)/wheel
	$(BIN)/python -m zipfile -e $(ET_ARM)/wheel/executorch-$(ET_VERSION)-*.whl $(ET_ARM)
	rm -rf $(ET_ARM)/wheel

# the native unit tests (ctest: JSON, SHA-256, safetensors, AdamW) first, then the Python suite
test: venv native
	$(BIN)/ctest --test-dir $(NATIVE) --output-on-failure
	$(BIN)/python -m pytest -q

# the fast tier: the slow tests (marked `slow`) and the end-to-end files are left to make test
CHECK_TESTS ?= tests/test_schedule.py tests/test_profiles.py tests/test_cli_errors.py \
	tests/test_lean_runtime.py tests/test_tiny_latent_data.py tests/test_rng.py tests/test_tiles.py::test_tile_grid \
	tests/test_positions.py tests/test_formats.py tests/test_lint.py tests/test_tensorfile_headers.py \
	$(foreach b,torch ort executorch,"tests/test_contract.py::test_one_step_equals_the_torch_resident_step[$(b)-flux-resident]")
check: venv
	$(BIN)/python -m pytest -q -m "not slow" $(CHECK_TESTS)

# mypy checks the installed package names (blockskip.runtime -> runtime/, ...): package-dir maps them,
# so their folders are linked under build/mypy/blockskip (pyproject's [tool.mypy] mypy_path)
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	mkdir -p build/mypy/blockskip
	for d in runtime device_train export profiles; do ln -sfn ../../../$$d build/mypy/blockskip/$$d; done
	$(BIN)/mypy -p blockskip.runtime -p blockskip.device_train -p blockskip.export

clean:
	rm -rf $(VENV) out build *.egg-info
