#!/bin/bash
# stop.sh: end the steps runner and whatever step it runs (its process group: README.md starts it
# with setsid), then Ray. Before starting another steps file in the same lease. A pattern for
# pkill would also match the calling command's own shell, whose text names the same scripts.
pid=$(cat /tmp/r/steps.pid 2>/dev/null)
step=$(cat /tmp/r/step.pid 2>/dev/null)  # the running step's timeout, a process group of its own
[ -n "$pid" ] && kill -- -"$pid" 2>/dev/null
[ -n "$step" ] && kill -- -"$step" 2>/dev/null
sleep 2
ray stop --force > /dev/null 2>&1
rm -f /tmp/steps-run.sh /tmp/r/steps.pid /tmp/r/step.pid
echo "stopped ${pid:-nothing}"
