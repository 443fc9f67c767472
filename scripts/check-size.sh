#!/usr/bin/env bash
# Guards the repository against large files: heavy artifacts belong in the
# cache (/var/cache/cube), never in git. Fails if a tracked file exceeds
# MAX_FILE bytes or all tracked files together exceed MAX_TOTAL bytes.
set -euo pipefail
MAX_FILE=${MAX_FILE:-2097152}     # 2 MiB
MAX_TOTAL=${MAX_TOTAL:-52428800}  # 50 MiB
cd "$(git rev-parse --show-toplevel)"
total=0; bad=0
while IFS= read -r -d '' f; do
  [ -f "$f" ] || continue
  s=$(stat -c %s "$f")
  total=$((total + s))
  if [ "$s" -gt "$MAX_FILE" ]; then echo "check-size: $f is $s bytes (max $MAX_FILE): keep it out of git" >&2; bad=1; fi
done < <(git ls-files -z)
if [ "$total" -gt "$MAX_TOTAL" ]; then echo "check-size: tracked files total $total bytes (max $MAX_TOTAL)" >&2; bad=1; fi
echo "check-size: $(git ls-files | wc -l) tracked files, $total bytes"
exit $bad
