#!/usr/bin/env bash
# The serving benchmark (bench_serve.py: continuous batching at concurrency 1, 8 and 32, issue 13)
# on the GPU machine, as one command. It is not a line of gpu_suite.sh: that suite's 9 minutes are
# spoken for, and the GPU machine's python3 lacks part of the serve extra (FastAPI, Starlette,
# pydantic, uvicorn, httptools), which travels there as wheels:
#
#   benchmarks/gpu_serve.sh --fetch                 # here, with pip: Python 3.12 wheels into .whl/ (git-ignored)
#   benchmarks/gpu_serve.sh                         # there, in a device run carrying .whl: ~3 minutes
#   benchmarks/gpu_serve.sh --small --device cpu    # the same plumbing at toy size (tests/test_gpu_suite.py)
#
# A run installs whatever .whl/ holds into a temporary folder put first on PYTHONPATH (nothing is
# installed into the machine's python3), then runs bench_serve.py with the other arguments
# (default: --device cuda, the ~1.2B GLM in bf16). PYTHON picks another interpreter, WHEELS_DIR
# another folder of wheels.
set -eu
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS_DIR=${WHEELS_DIR:-.whl}
# The versions the serve tests pass with here, with what they need (typing_extensions: pydantic needs
# a newer one than the machine may hold); anyio, h11, click, uvloop, prometheus-client and httpx are
# on our H200 machine's python3 already.
WHEELS=(fastapi==0.165.0 starlette==1.10.0 annotated-doc==0.0.7 opentelemetry-api==1.45.2 pydantic==2.14.4 pydantic_core==2.50.5
    annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0 uvicorn==0.54.0 httptools==0.9.0)
GPU_PYTHON_VERSION=3.12  # our H200 machine's python3

if [ "${1:-}" = "--fetch" ]; then
    platforms=()
    for platform in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
        platforms+=(--platform "$platform")
    done
    "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version "$GPU_PYTHON_VERSION" \
        --implementation cp "${platforms[@]}" -d "$WHEELS_DIR" "${WHEELS[@]}"
    echo "gpu_serve.sh: $(ls "$WHEELS_DIR"/*.whl | wc -l) wheels in $WHEELS_DIR/; carry it: run(..., carry=[\"$WHEELS_DIR\"])"
    exit 0
fi

if compgen -G "$WHEELS_DIR/*.whl" > /dev/null; then
    site=$(mktemp -d)
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$WHEELS_DIR"/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PYTHON" -c "import fastapi, uvicorn, prometheus_client, httpx" 2> /dev/null; then
    echo "gpu_serve.sh: $PYTHON lacks the serve extra; run benchmarks/gpu_serve.sh --fetch where pip works and carry $WHEELS_DIR/" >&2
    exit 2
fi
case " $* " in
    *" --device "*) exec "$PYTHON" benchmarks/bench_serve.py "$@" ;;
    *) exec "$PYTHON" benchmarks/bench_serve.py --device cuda "$@" ;;
esac
