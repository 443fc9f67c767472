#!/usr/bin/env bash
# Installs the Debian packages named as arguments that are not installed yet.
# Runs `apt-get update` only when something is missing.
set -euo pipefail
missing=()
for p in "$@"; do
  # A tool already on PATH under the package's name (e.g. npm bundled with
  # a nodejs build) counts as installed: never fight another packaging.
  command -v "$p" >/dev/null 2>&1 && continue
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "deps: installing ${missing[*]}"
if [ "$(id -u)" != 0 ]; then echo "deps: need root to install ${missing[*]}" >&2; exit 1; fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
