"""Load test of a running sitefit server: N concurrent clients upload, then poll.

Two phases of ``--duration`` seconds each, with ``--clients`` concurrent clients:

1. ingest: every client uploads the scan (``POST /v1/jobs``) back to back; reported are the
   accepted uploads per second and the upload latency (streaming, validation, queueing).
2. poll: every client polls ``GET /v1/jobs/{id}`` of random jobs from phase 1 every
   ``--poll-interval`` seconds while the workers chew through the backlog; reported are the
   status-poll latency percentiles (what a dashboard watching many jobs sees).

Then the jobs' statuses are counted and, unless ``--keep``, every job is deleted (canceling
what has not run). Non-2xx answers are counted by status code. Not part of ``make test``.

    sitefit serve &                                   # embedded mode, or API + workers
    python bench/load.py --url http://127.0.0.1:8000 --model demo-brain --clients 8

Without ``--scan`` a small brain phantom is generated (numpy only, no torch).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx2


@dataclass
class Tally:
    upload_s: list[float] = field(default_factory=list)
    poll_s: list[float] = field(default_factory=list)
    job_ids: list[str] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def uploader(
    http: httpx2.AsyncClient, args: argparse.Namespace, scan: bytes, stop_at: float, tally: Tally
) -> None:
    data = {"model": args.model, "mode": args.mode}
    if args.site:
        data["site"] = args.site
    while time.monotonic() < stop_at:
        started = time.monotonic()
        response = await http.post(
            "/v1/jobs", files={"file": ("scan.nii.gz", scan)}, data=data, timeout=120
        )
        if response.status_code != 202:
            tally.errors[f"POST {response.status_code}"] += 1
            continue
        tally.upload_s.append(time.monotonic() - started)
        tally.job_ids.append(response.json()["id"])


async def poller(
    http: httpx2.AsyncClient, args: argparse.Namespace, stop_at: float, tally: Tally
) -> None:
    rng = random.Random()
    while time.monotonic() < stop_at and tally.job_ids:
        started = time.monotonic()
        response = await http.get(f"/v1/jobs/{rng.choice(tally.job_ids)}", timeout=60)
        tally.poll_s.append(time.monotonic() - started)
        if response.status_code != 200:
            tally.errors[f"GET {response.status_code}"] += 1
        await asyncio.sleep(args.poll_interval)


async def statuses(http: httpx2.AsyncClient, job_ids: list[str], delete: bool) -> Counter[str]:
    """Every job's status at the end of the run (then, with ``delete``, delete them all)."""
    counts: Counter[str] = Counter()
    for job_id in job_ids:
        response = await http.get(f"/v1/jobs/{job_id}", timeout=60)
        counts[response.json()["status"] if response.status_code == 200 else "gone"] += 1
    if delete:
        for job_id in job_ids:
            await http.delete(f"/v1/jobs/{job_id}", timeout=60)
    return counts


def summary(
    tally: Tally, ingest_s: float, poll_s: float, counts: Counter[str], args: argparse.Namespace
) -> dict[str, object]:
    def ms(values: list[float], q: float) -> float | None:
        value = percentile(values, q)
        return None if value is None else round(1000 * value, 2)

    return {
        "clients": args.clients,
        "mode": args.mode,
        "ingest_s": round(ingest_s, 2),
        "uploads": len(tally.upload_s),
        "uploads_per_s": round(len(tally.upload_s) / ingest_s, 2),
        "upload_ms": {f"p{q}": ms(tally.upload_s, q) for q in (50, 95, 99)},
        "poll_s": round(poll_s, 2),
        "polls": len(tally.poll_s),
        "polls_per_s": round(len(tally.poll_s) / poll_s, 1) if poll_s else None,
        "poll_ms": {
            **{f"p{q}": ms(tally.poll_s, q) for q in (50, 90, 95, 99)},
            "mean": round(1000 * statistics.fmean(tally.poll_s), 2) if tally.poll_s else None,
            "max": ms(tally.poll_s, 100),
        },
        "job_statuses_at_end": dict(counts),
        "errors": dict(tally.errors),
    }


def phantom_scan() -> bytes:
    from sitefit.phantoms import write_dataset

    with tempfile.TemporaryDirectory() as tmp:
        out = write_dataset("brain", "c15t", 1, 7, Path(tmp), 40.0)
        return next((out / "imagesTr").iterdir()).read_bytes()


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    scan = args.scan.read_bytes() if args.scan else phantom_scan()
    headers = {"Authorization": f"Bearer {args.key}"} if args.key else {}
    limits = httpx2.Limits(max_connections=args.clients * 2)
    async with httpx2.AsyncClient(base_url=args.url, headers=headers, limits=limits) as http:
        ready = await http.get("/readyz", timeout=10)
        if ready.status_code != 200:
            raise SystemExit(f"server not ready: {ready.status_code} {ready.text}")
        tally = Tally()
        started = time.monotonic()
        stop_at = started + args.duration
        await asyncio.gather(
            *(uploader(http, args, scan, stop_at, tally) for _ in range(args.clients))
        )
        ingest_s = time.monotonic() - started
        started = time.monotonic()
        stop_at = started + args.duration
        await asyncio.gather(*(poller(http, args, stop_at, tally) for _ in range(args.clients)))
        poll_s = time.monotonic() - started
        counts = await statuses(http, tally.job_ids, delete=not args.keep)
        return summary(tally, ingest_s, poll_s, counts, args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", required=True, help="NAME or NAME@VERSION on the server")
    parser.add_argument("--scan", type=Path, help=".nii.gz to upload (default: a phantom)")
    parser.add_argument("--site", default="bench")
    parser.add_argument("--mode", default="none", choices=["auto", "adapt", "cached", "none"])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per phase")
    parser.add_argument("--poll-interval", type=float, default=0.0, help="pause between polls")
    parser.add_argument("--keep", action="store_true", help="do not delete the jobs at the end")
    parser.add_argument("--key", help="API key (Authorization: Bearer)")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args(argv)
    result = asyncio.run(main_async(args))
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
