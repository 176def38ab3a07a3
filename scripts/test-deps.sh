#!/usr/bin/env bash
# Installs the system packages the tests need and npm cannot bring: Debian's Chromium for the
# browser tests (driven by playwright-core; never a downloaded browser). Runs before `npm test`
# and from .ci/run. As root it installs with apt-get; otherwise it only says what is missing,
# and the browser test then fails with the same message.
set -euo pipefail
chromium="${KEEL_CHROMIUM:-/usr/bin/chromium}"
if [ -x "$chromium" ]; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing Debian's chromium for the browser tests"
  apt-get install -y chromium >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y chromium >/dev/null; }
else
  echo "chromium is missing at $chromium: install it (apt-get install -y chromium) or set KEEL_CHROMIUM" >&2
fi
