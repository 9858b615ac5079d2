"""Starts N TensorFlow workers for a keras_das binary, each with its own TF_CONFIG.

One machine, N processes on loopback (handy for testing, or one process per GPU):

    python launch/multi_worker.py --num_workers=2 -- \\
        python -m keras_das.search --config=configs/cifar.py --workdir=/shared/search

Several machines: run the same command on every host with the full worker list and that
host's index (the workdir must be on a filesystem all hosts share):

    python launch/multi_worker.py --workers=host1:23456,host2:23456 --index=0 -- python -m ...
    python launch/multi_worker.py --workers=host1:23456,host2:23456 --index=1 -- python -m ...

``--config.distribution.strategy=multi_worker`` is appended to the command, so the binary
builds a ``MultiWorkerMirroredStrategy``; the global batch in the config is split across all
workers. Worker 0 is the chief: it writes the workdir; the others write only their summary
under ``workdir/workers/``. The launcher exits non-zero if any worker fails, and stops the
others when one fails or when it is interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("localhost", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tf_config(workers: list[str], index: int) -> str:
    return json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num_workers", type=int, help="start this many local workers on loopback")
    parser.add_argument("--workers", help="host:port of every worker, comma separated (multi-host)")
    parser.add_argument("--index", type=int, help="with --workers: the worker this host runs")
    parser.add_argument(
        "command", nargs=argparse.REMAINDER, help="-- then the binary's command line"
    )
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    command = [*command, "--config.distribution.strategy=multi_worker"]
    if args.workers:
        if args.index is None:
            parser.error("--workers needs --index (which worker this host runs)")
        workers = args.workers.split(",")
        indices = [args.index]
    elif args.num_workers:
        workers = [f"localhost:{port}" for port in free_ports(args.num_workers)]
        indices = list(range(args.num_workers))
    else:
        parser.error("give --num_workers (one machine) or --workers and --index (several)")

    processes = []
    for index in indices:
        env = {**os.environ, "TF_CONFIG": tf_config(workers, index)}
        processes.append(subprocess.Popen(command, env=env))
        print(f"worker {index}: pid {processes[-1].pid}", file=sys.stderr, flush=True)

    def stop(*_):
        for p in processes:
            if p.poll() is None:
                p.terminate()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    status = 0
    while any(p.poll() is None for p in processes):
        failed = [p for p in processes if p.poll() not in (None, 0)]
        if failed:
            status = failed[0].returncode
            stop()
        time.sleep(0.5)
    codes = [p.returncode for p in processes]
    print(f"worker exit codes: {codes}", file=sys.stderr)
    return status or next((c for c in codes if c), 0)


if __name__ == "__main__":
    sys.exit(main())
