#!/bin/bash
# poll.sh SECONDS STEP: wait up to SECONDS for /tmp/r/STEP.done, then copy STEP's results to $OUT
# (at most 8 files come back: the step's JSON and log, and the steps' log).
limit=$1 name=$2; t0=$SECONDS
while [ ! -e /tmp/r/$name.done ] && [ $((SECONDS - t0)) -lt "$limit" ]; do sleep 5; done
cat /tmp/r/steps.log 2>/dev/null
cp /tmp/r/steps.log "$OUT/" 2>/dev/null
for f in /tmp/r/$name.json /tmp/r/$name.done; do [ -e "$f" ] && cp "$f" "$OUT/"; done
[ -e /tmp/r/$name.log ] && tail -c 300000 /tmp/r/$name.log > "$OUT/$name.log"
echo "--- tail of $name.log"; tail -25 /tmp/r/$name.log 2>/dev/null
