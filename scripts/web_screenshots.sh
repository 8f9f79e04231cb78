#!/usr/bin/env bash
# Screenshots of the web labeller's pages for the README, taken by the browser test on the current code:
#   make browser-deps && scripts/web_screenshots.sh      -> docs/images/web-label.png, docs/images/web-admin.png
set -euo pipefail
cd "$(dirname "$0")/.."
DPO_CLI_SCREENSHOTS="$PWD/docs/images" DPO_CLI_REQUIRE_SYSTEM_TESTS=1 .venv/bin/python -m pytest -q tests/data/test_web.py -k real_browser
