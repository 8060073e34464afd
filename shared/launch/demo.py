"""End-to-end demo of one mixed worker: start it, wait for /health, generate, print, stop it.

    python -m pdserve.shared.launch.demo --prompt "What is the capital of France?"

Steps: `worker --role mixed --port 0` in the background (free ports, read from its ready line),
wait for `/health` 200, stream the completion of the prompt (chat template applied unless
`--no-chat`) with the one-shot client, print its meta info, then SIGTERM and check exit status 0.
Extra worker flags go after `--`: `python -m pdserve.shared.launch.demo -- --max-total-tokens 4096`.
"""

from __future__ import annotations

import argparse
import json
import sys

from pdserve.shared.args import DEFAULT_MODEL
from pdserve.shared.launch.worker_process import WorkerProcess
from pdserve.shared.worker.client import WorkerClient, generate_text, prompt_ids


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", default=DEFAULT_MODEL)
    parser.add_argument("--prompt", default="What is the capital of France?")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--no-chat", action="store_true", help="send the prompt without the chat template")
    parser.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for /health")
    parser.add_argument("worker_args", nargs="*", help="extra flags for the worker (after --)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from pdserve.shared.tokenizer import get_tokenizer

    ns = build_parser().parse_args(argv)
    worker_args = ["--role", "mixed", "--port", "0", "--model-path", ns.model_path, *ns.worker_args]
    print(f"starting: worker {' '.join(worker_args)}", file=sys.stderr)
    with WorkerProcess(worker_args) as worker:
        try:
            worker.wait_ready(ns.startup_timeout)
        except (RuntimeError, TimeoutError) as exc:
            print(f"demo: {exc} (its log is above)", file=sys.stderr)
            return 1
        print(f"worker ready: zmq={worker.zmq_address} http={worker.http_url}", file=sys.stderr)
        tokenizer = get_tokenizer(ns.model_path)
        ids = prompt_ids(tokenizer, ns.prompt, chat=not ns.no_chat)
        print(f"prompt: {ns.prompt}\ncompletion: ", end="", flush=True)
        with WorkerClient(worker.zmq_address) as client:
            meta = generate_text(
                client, tokenizer, ids, {"max_new_tokens": ns.max_new_tokens, "temperature": 0.0}
            )
        print(json.dumps({"meta_info": meta}))
        status = worker.stop()
    print(f"worker stopped with status {status}", file=sys.stderr)
    return 0 if status == 0 and not meta["error"] else 1


if __name__ == "__main__":
    sys.exit(main())
