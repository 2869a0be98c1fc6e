"""AWS Lambda Powertools' idempotency utility on a local Redis, outside Lambda: the peer
row of `examples/bench.rs`'s Redis table.

`idempotent_function` with `RedisCachePersistenceLayer` wraps a body that counts its
executions. Each case runs N messages, sequentially or on W threads (what a Python
consumer does), first deliveries (new keys) and duplicates (keys already completed), and
prints one line per case on stdout: the case (`first` or `duplicate`), the workers, the
messages, the seconds and the body's executions, separated by spaces (the first
deliveries must execute N times, the duplicates 0).

Usage: bench.py --url redis://127.0.0.1:6379/0 --messages N --workers W --prefix P
"""

import argparse
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

from aws_lambda_powertools.utilities.idempotency import (
    IdempotencyConfig,
    idempotent_function,
)
from aws_lambda_powertools.utilities.idempotency.persistence.redis import (
    RedisCachePersistenceLayer,
)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--messages", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--prefix", required=True)
    args = parser.parse_args()
    # outside Lambda there is no context to register; Powertools warns on every call
    warnings.simplefilter("ignore")

    # the same expiry as the framework's default ttl; the in-memory cache off, so every
    # call asks Redis as the framework does
    layer = RedisCachePersistenceLayer(url=args.url)
    config = IdempotencyConfig(
        event_key_jmespath="id", expires_after_seconds=7 * 24 * 3600, use_local_cache=False
    )
    executions = 0
    lock = threading.Lock()

    @idempotent_function(
        data_keyword_argument="order",
        persistence_store=layer,
        config=config,
        key_prefix=args.prefix,
    )
    def handle(order: dict) -> dict:
        nonlocal executions
        with lock:
            executions += 1
        return {"ok": order["id"]}

    orders = [{"id": f"{args.prefix}-{i}"} for i in range(args.messages)]

    def run(case: str) -> None:
        nonlocal executions
        executions = 0
        start = time.perf_counter()
        if args.workers <= 1:
            for o in orders:
                handle(order=o)
        else:
            with ThreadPoolExecutor(max_workers=args.workers) as pool:
                for _ in pool.map(lambda o: handle(order=o), orders):
                    pass
        seconds = time.perf_counter() - start
        print(f"{case} {args.workers} {args.messages} {seconds:.6f} {executions}", flush=True)

    run("first")
    run("duplicate")
    # the records this run wrote
    client = layer.client
    keys = list(client.scan_iter(match=f"{args.prefix}#*", count=1000))
    for i in range(0, len(keys), 1000):
        client.delete(*keys[i : i + 1000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
