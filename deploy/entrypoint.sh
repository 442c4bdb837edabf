#!/bin/sh
# The image's entrypoint (PID 1): TorchServe in the foreground with the given arguments (the image's
# CMD by default). `torchserve --start --foreground` does not pass signals on to the Java frontend, so
# on SIGTERM (podman/docker stop, Kubernetes ending a pod) this runs `torchserve --stop`: the frontend
# and its workers shut down within the grace period, and the container exits with TorchServe's status.
set -u
torchserve --start --foreground "$@" &
server=$!
trap 'torchserve --stop >/dev/null 2>&1' TERM INT
wait "$server"
status=$?
if kill -0 "$server" 2>/dev/null; then  # the wait was cut short by a signal: let the stop finish
    wait "$server"
    status=$?
fi
exit "$status"
