"""Send one Celery task the way the Python service does, for Rust tests.

Two modes, each printing one JSON line on stdout and exiting 0:

``send``
    Publishes the task with the default (JSON) serializer, waits for its
    result through the ``rpc://`` backend, and prints one of
    ``{"status": "SUCCESS", "result": ...}``,
    ``{"status": "FAILURE", "exc_type": ..., "exc_module": ...,
    "exc_message": ...}`` or ``{"status": "TIMEOUT"}``.

``send-pickled``
    Publishes the task serialized with pickle and prints
    ``{"task_id": ...}`` without waiting: a worker that only accepts JSON
    has to reject it.

The broker URL comes from ``--broker`` or ``CELERY_BROKER_URL``; args and
kwargs are JSON texts (``--args '["a", "b"]' --kwargs '{"k": 1}'``).
Anything else (the broker cannot be reached, bad arguments) is a Python
error on stderr and a non-zero exit.
"""

import argparse
import json
import os
import sys

from celery import Celery
from celery.exceptions import TimeoutError as ResultTimeout


def main():
    options = parse_arguments()
    app = Celery("producer", broker=options.broker, backend="rpc://")
    if options.mode == "send-pickled":
        app.conf.task_serializer = "pickle"
        app.conf.accept_content = ["json", "pickle"]
        result = app.send_task(
            options.task,
            args=options.args,
            kwargs=options.kwargs,
            serializer="pickle",
        )
        report({"task_id": result.id})
        return

    result = app.send_task(options.task, args=options.args,
                           kwargs=options.kwargs)
    try:
        value = result.get(timeout=options.timeout)
    except ResultTimeout:
        report({"status": "TIMEOUT", "task_id": result.id})
    except Exception as exc:  # the task's own exception, rebuilt
        report({
            "status": "FAILURE",
            "task_id": result.id,
            "exc_type": type(exc).__name__,
            "exc_module": type(exc).__module__,
            "exc_message": str(exc),
        })
    else:
        report({"status": "SUCCESS", "task_id": result.id,
                "result": value})


def parse_arguments():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["send", "send-pickled"])
    parser.add_argument("--broker",
                        default=os.environ.get("CELERY_BROKER_URL"))
    parser.add_argument("--task", required=True)
    parser.add_argument("--args", type=json.loads, default=[])
    parser.add_argument("--kwargs", type=json.loads, default={})
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="seconds to wait for the result")
    options = parser.parse_args()
    if not options.broker:
        parser.error("give --broker or set CELERY_BROKER_URL")
    return options


def report(outcome):
    print(json.dumps(outcome, default=repr), flush=True)


if __name__ == "__main__":
    sys.exit(main())
