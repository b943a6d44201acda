"""Stands in for `vllm serve` where there is no GPU (the launcher's and the calibration tool's tests).

    python tests/vllm_standin.py --log LOG --mode MODE [--record FILE] -- MODEL --host H --port P ARGS...

Like vLLM it runs an engine-core child in its own process group and logs as it goes: the lines of
LOG (tests/data/vllm/: vLLM's own logs), --delay seconds apart, then per MODE
  serve     answers GET /health with 200 on --port until it is stopped
  fail      exits 1 after the lines (vLLM's engine core died)
  stubborn  like serve, but it and its child ignore SIGTERM (the launcher must SIGKILL them)
  silent    logs nothing more and never answers (a hung start)
--record appends the command line it got and its child's pid, one JSON object a line.
"""
from __future__ import annotations

import argparse
import http.server
import json
import multiprocessing
import signal
import sys
import time


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


def _engine_core(ignore_term: bool) -> None:
    if ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        time.sleep(1)


def main() -> int:
    argv = sys.argv[1:]
    split = argv.index("--")
    p = argparse.ArgumentParser()
    p.add_argument("--log", required=True)
    p.add_argument("--mode", choices=("serve", "fail", "stubborn", "silent"), default="serve")
    p.add_argument("--record")
    p.add_argument("--delay", type=float, default=0.005)   # a real log's 600 lines in ~3 s
    a = p.parse_args(argv[:split])
    served = argv[split + 1:]
    port = int(served[served.index("--port") + 1])
    stubborn = a.mode == "stubborn"
    if stubborn:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = multiprocessing.get_context("fork").Process(target=_engine_core, args=(stubborn,), daemon=False)
    child.start()
    if a.record:
        with open(a.record, "a") as f:
            f.write(json.dumps({"argv": served, "child": child.pid}) + "\n")
    if a.mode == "silent":
        time.sleep(3600)
    for line in open(a.log).read().splitlines():
        print(line, flush=True)
        time.sleep(a.delay)
    if a.mode == "fail":
        child.kill()
        return 1
    http.server.HTTPServer(("127.0.0.1", port), _Health).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
