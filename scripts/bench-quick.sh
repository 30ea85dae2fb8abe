#!/usr/bin/env bash
# bench-quick.sh -- a quick smoke run of the benchmark: scripts/bench.sh with 5,000 messages
# and 1 run per scenario and tool.
#
# Usage: scripts/bench-quick.sh [bench.sh options...]   (later options override, e.g. --tools)
#
# Like bench.sh, it never touches anything outside its scratch directory, the --out file and
# cargo's target directory.
exec "$(dirname "$0")/bench.sh" --messages 5000 --runs 1 "$@"
