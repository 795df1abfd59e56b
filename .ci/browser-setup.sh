#!/usr/bin/env bash
# Installs what the notebook and browser tests need (tests/test_notebooks.py, tests/test_browser.py):
# Debian's chromium (Playwright's own browser download cannot work offline), the Python packages,
# and the two npm files of the offline notebook export (require.js, @jupyter-widgets/html-manager).
# Run with the project's Python environment active; idempotent; about 1-2 minutes on a fresh machine.
set -euo pipefail
PY=${PYTHON:-python}

if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" != 0 ]; then
  echo "browser-setup: Debian's chromium is missing and installing it needs root (apt-get install chromium);" \
       "the browser tests will be skipped" >&2
elif ! command -v chromium >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
if ! command -v npm >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null
fi
"$PY" -m pip install -q "playwright>=1.45" "jupyterlab>=4.1" "jupyter_bokeh>=4.0" "nbclient>=0.10" \
  "nbconvert>=7.16" "nbformat>=5.9" "ipykernel>=6.29" "pillow>=10" "pypdf>=4"
if command -v npm >/dev/null 2>&1; then
  "$PY" -c "from widgets.export import offline_js; print('widget manager JS in', offline_js()['embed-amd.js'].parent)"
else
  echo "browser-setup: npm is missing; the offline notebook export cannot fetch its two JS files" >&2
fi
if command -v chromium >/dev/null 2>&1; then chromium --version; fi
