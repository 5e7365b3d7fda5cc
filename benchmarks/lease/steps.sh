#!/bin/bash
# steps.sh STEPS_FILE: each line "NAME SECONDS COMMAND..." in order (README.md); output in /tmp/r/NAME.log,
# its end in /tmp/r/NAME.done, a line per start and end in /tmp/r/steps.log. Runs from a copy of
# itself and of the steps file: later calls replace the tree, and bash reads a script as it goes.
if [ "$0" != /tmp/steps-run.sh ]; then
  cp "$0" /tmp/steps-run.sh && cp "$1" /tmp/steps-run.list && cd "$(dirname "$0")/../.." && exec bash /tmp/steps-run.sh /tmp/steps-run.list
fi
export PYTHONPATH=$PWD:/tmp/site:/tmp/site2 PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=12
mkdir -p /tmp/r
echo $$ > /tmp/r/steps.pid  # stop.sh ends this runner's process group (setsid made it its own)
while read -r name limit command; do
  case "$name" in ''|'#'*) continue;; esac
  if [ "$name" = wait-serve ]; then
    for _ in $(seq 900); do [ -e /tmp/site2/.ready ] && break; sleep 1; done; continue
  fi
  echo "$(date -u +%T) start $name" >> /tmp/r/steps.log
  # timeout leads a process group of its own: its pid is stop.sh's handle on the step.
  timeout -k 20 "$limit" bash -c "$command" > /tmp/r/$name.log 2>&1 < /dev/null &
  echo $! > /tmp/r/step.pid
  wait $!
  rc=$?
  ray stop --force > /dev/null 2>&1; pkill -f "[b]enchmarks/bench_"; sleep 2
  echo "rc=$rc $(date -u +%T)" > /tmp/r/$name.done
  echo "$(date -u +%T) end $name rc=$rc" >> /tmp/r/steps.log
done < /tmp/steps-run.list
echo "$(date -u +%T) all done" >> /tmp/r/steps.log
