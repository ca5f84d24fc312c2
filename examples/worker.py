#!/usr/bin/env python3
"""A complete khived worker: reads one JSON request per line on stdin, writes one JSON
reply per line on stdout. Run it warm behind the daemon with:

    khived serve --workers 2 --worker python3 examples/worker.py

and call it from any shell:

    khived call 'upper hello'      # prints HELLO

Anything a worker prints to stderr lands in the daemon's log, prefixed with its id.

Each request carries an "id"; echoing it in the reply, as this worker does, lets the daemon
check that every reply answers the request it is waiting for.
"""
import json
import os
import sys
import time

WORKER_ID = os.environ.get("KHIVED_WORKER_ID", "?")


def load_model():
    # Stands for the slow start-up a warm worker pays only once: loading an index, a model.
    time.sleep(0.2)
    return {"upper": str.upper, "lower": str.lower, "reverse": lambda s: s[::-1]}


def handle(model, request):
    verb, _, text = request["ops"].partition(" ")
    if verb == "crash":
        sys.exit(3)
    if verb == "hang":
        time.sleep(3600)
    if verb == "garbage":
        return "this is not JSON"
    if verb == "sleep":
        print(f"worker {WORKER_ID} sleeping {text}s", file=sys.stderr, flush=True)
        time.sleep(float(text))
        return {"ok": True, "result": text}
    if verb == "mojibake":
        # Not UTF-8, on purpose: the daemon must keep reading this worker's stderr.
        sys.stderr.buffer.write(b"\xff\xfe not utf-8\n")
        sys.stderr.flush()
        return {"ok": True, "result": "logged"}
    if verb == "whoami":
        return {"ok": True, "result": WORKER_ID}
    if verb not in model:
        return {"ok": False, "error": f"unknown verb {verb!r}"}
    return {"ok": True, "result": model[verb](text)}


def main():
    model = load_model()
    print(f"worker {WORKER_ID} ready", file=sys.stderr, flush=True)
    for line in sys.stdin:
        request_id = None
        try:
            request = json.loads(line)
            request_id = request.get("id")
            reply = handle(model, request)
        except Exception as e:  # a bad request is an error reply, not a dead worker
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        if isinstance(reply, dict):
            # Echo the request's id: the daemon checks that the reply answers its request.
            reply = json.dumps({"id": request_id, **reply})
        sys.stdout.write(reply + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
