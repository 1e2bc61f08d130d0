#!/bin/sh
# Installs Debian's headless-capable Chromium for the browser test (tests/test_web_ui.py) when it is missing.
# `make test` runs it first; CI runs as root on a clean Debian machine, developers may need sudo.
set -eu

if [ -x /usr/bin/chromium ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-chromium: no apt-get here; install Chromium yourself (the browser test skips without it)" >&2
  exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
  SUDO=""
elif command -v sudo >/dev/null 2>&1; then
  SUDO="sudo"
else
  echo "install-chromium: not root and no sudo; install the 'chromium' package yourself" >&2
  exit 0
fi
echo "[chipi] installing chromium for the browser test (apt-get)"
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends chromium
