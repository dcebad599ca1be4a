#!/usr/bin/env bash
# Installs the system packages the local stack and the tests need, when they are missing:
#   redis-server (Redis with AOF), Java 17+ and Maven (to fetch and run Kafka's jars),
#   promtool (from Debian's `prometheus` package; checks the metrics exposition),
#   npm and Node.js (run the AsyncAPI CLI that validates docs/asyncapi.yaml).
# Uses apt-get as root, or sudo; elsewhere it says what to install and fails.
set -euo pipefail

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v java >/dev/null || missing+=(default-jre-headless)
command -v mvn >/dev/null || missing+=(maven)
command -v promtool >/dev/null || missing+=(prometheus)
command -v npm >/dev/null || missing+=(npm)

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

if ! command -v apt-get >/dev/null; then
  echo "missing: ${missing[*]} (no apt-get here: install them with your package manager)" >&2
  exit 1
fi
if [ "$(id -u)" -eq 0 ]; then
  sudo_cmd=()
elif command -v sudo >/dev/null; then
  sudo_cmd=(sudo)
else
  echo "missing: ${missing[*]} (run as root or install them: apt-get install -y ${missing[*]})" >&2
  exit 1
fi

echo "[deps] installing ${missing[*]} with apt-get"
export DEBIAN_FRONTEND=noninteractive
"${sudo_cmd[@]}" apt-get update -qq
"${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
