#!/usr/bin/env bash
# One check of the CUDA path on a bare GPU machine with no network, in under 8 minutes: installs
# the project's Python dependencies from a folder of wheels that travels with the working tree,
# installs the project itself (pip install --no-deps -e .), then runs benchmarks/gpu_check.py
# (CUDA tests, graph count under compile, syncs and kernels per epoch, throughput table).
#
#   benchmarks/gpu_check.sh [--wheels DIR] [--out DIR] [--budget-s S] [gpu_check.py options]
#   benchmarks/gpu_check.sh --fetch-wheels DIR [--python-version 3.12]   # here, with network: fill DIR
#   benchmarks/gpu_check.sh --cpu-dry-run [--out DIR]                    # tiny sizes on the CPU, no install
#   benchmarks/gpu_check.sh --install-only --wheels DIR                  # just the offline install
#
# --wheels defaults to .whl/ when it exists. --out defaults to $OUT, else /tmp/gpu-check-out; it
# receives gpu_check.json, gpu_check.md, gpu_check.log and install.log. GPU_CHECK_BUDGET_S (450)
# is the seconds for install and checks together. PYTHON picks the interpreter (python3).
# Exit status: that of gpu_check.py (1 when a part failed or ran out of time), 3 when the install
# left the project unimportable.
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 2
PY="${PYTHON:-python3}"
wheels=""
out="${OUT:-/tmp/gpu-check-out}"
fetch=""
pyver="3.12"
dry=0
install_only=0
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) wheels="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --fetch-wheels) fetch="$2"; shift 2 ;;
        --python-version) pyver="$2"; shift 2 ;;
        --install-only) install_only=1; shift ;;
        --cpu-dry-run) dry=1; args+=("$1"); shift ;;
        -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) args+=("$1"); shift ;;
    esac
done

if [ -n "$fetch" ]; then
    exec "$PY" benchmarks/gpu_check.py --fetch-wheels "$fetch" --python-version "$pyver"
fi

started=$(date +%s)
mkdir -p "$out"
install_log="$out/install.log"
if [ -z "$wheels" ] && [ "$dry" = 0 ] && [ -d "$root/.whl" ]; then
    wheels="$root/.whl"
fi

pip_q() { "$PY" -m pip --disable-pip-version-check "$@"; }

install() {
    # Prints "install status: ok|partial|failed" last; gpu_check.py reads it back from the log.
    local status=ok
    echo "python: $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
    echo "wheels: $wheels ($(ls "$wheels"/*.whl 2>/dev/null | wc -l) files)"
    if [ -f "$wheels/requirements.txt" ] &&
        pip_q install --no-index --find-links "$wheels" --no-cache-dir -r "$wheels/requirements.txt"; then
        echo "dependencies: resolved $wheels/requirements.txt against what is installed"
    else
        echo "dependencies: resolution failed; installing every wheel in $wheels without resolution"
        status=partial
        if ! pip_q install --no-index --no-deps --no-cache-dir "$wheels"/*.whl; then
            echo "dependencies: the environment refused them; into /tmp/gpu-check-site (PYTHONPATH)"
            if pip_q install --no-index --no-deps --no-cache-dir --target /tmp/gpu-check-site "$wheels"/*.whl; then
                export PYTHONPATH="/tmp/gpu-check-site${PYTHONPATH:+:$PYTHONPATH}"
            else
                status=failed
            fi
        fi
    fi
    # the project itself: its build needs setuptools and wheel, which the folder carries
    if pip_q install --no-deps --no-index --find-links "$wheels" --no-cache-dir -e .; then
        echo "project: pip install --no-deps -e . (build isolation, offline)"
    elif pip_q install --no-deps --no-build-isolation --no-cache-dir -e .; then
        echo "project: pip install --no-deps --no-build-isolation -e ."
    else
        echo "project: not installed; importable from the working tree (PYTHONPATH)"
        export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
        [ "$status" = ok ] && status=partial
    fi
    if "$PY" -c 'import optuna, sqlalchemy, plotly, yaml, typer, rich, tuner.cli; print("imports: optuna", optuna.__version__, "sqlalchemy", sqlalchemy.__version__, "typer", typer.__version__)'; then
        :
    else
        echo "imports: tuner.cli (optuna, sqlalchemy, plotly, yaml, typer, rich) does not import"
        status=failed
    fi
    echo "install status: $status"
}

if [ -n "$wheels" ] && [ "$dry" = 0 ]; then
    echo "[gpu_check.sh] installing from $wheels (log: $install_log)" >&2
    install >"$install_log" 2>&1
    tail -n 3 "$install_log" >&2
else
    {
        echo "nothing installed: $([ "$dry" = 1 ] && echo "--cpu-dry-run" || echo "no wheels folder (--wheels DIR or .whl/)")"
        echo "install status: skipped"
    } >"$install_log"
fi
if [ "$install_only" = 1 ]; then
    grep -q '^install status: \(ok\|partial\)' "$install_log"
    exit $?
fi
if ! "$PY" -c 'import tuner.training.train' >/dev/null 2>&1; then
    export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
    "$PY" -c 'import tuner.training.train' || { echo "[gpu_check.sh] tuner.training.train does not import" >&2; exit 3; }
fi

budget="${GPU_CHECK_BUDGET_S:-450}"
left=$(( budget - ($(date +%s) - started) ))
[ "$left" -lt 60 ] && left=60
PYTHONUNBUFFERED=1 "$PY" benchmarks/gpu_check.py --out "$out" --install-log "$install_log" --budget-s "$left" \
    ${args[@]+"${args[@]}"}
