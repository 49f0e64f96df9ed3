#!/usr/bin/env bash
# Run every fuzz target for a while (not part of CI, which only builds them).
#   fuzz/run.sh [SECONDS_PER_DECODER_TARGET] [WIRE_SECONDS]
# Decoder targets: frontend, backend, startup, sql (fuzz/decoders.rs); then the
# differential wire fuzzer (fuzz/wire.sh) against the local Postgres. Kept
# inputs go to fuzz/corpus/, findings to fuzz/findings/, and a summary with run
# times and execution counts to fuzz/last-run.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
per=${1:-120}
wire=${2:-300}
nice -n 10 cargo build -q --profile fuzz --examples --bin pgtier
out=fuzz/last-run.txt
: > "$out"
for t in frontend backend startup sql; do
  set +e
  nice -n 10 target/fuzz/examples/fuzz_decoders "$t" "$per" >> "$out"
  rc=$?
  set -e
  if [ $rc -ne 0 ]; then
    # An abort (stack overflow) kills the process: the input is in .current.
    cur=fuzz/findings/$t/.current
    if [ -f "$cur" ]; then
      mv "$cur" "fuzz/findings/$t/abort-$(date +%s)"
    fi
    echo "target=$t exited with status $rc (input kept in fuzz/findings/$t)" >> "$out"
  fi
done
if [ "$wire" -gt 0 ]; then
  fuzz/wire.sh "$wire" >> "$out"
fi
cat "$out"
