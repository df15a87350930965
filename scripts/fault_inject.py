"""Fault-injection benchmark of sip's writer on the shipped model: kill it, tear it, fill its disk, resume.

What it does (each fault is followed by a plain rerun of the same command, which must resume):

1. an uninterrupted ``sip synth`` and ``sip augment`` run (the references: SHA-256 of every image);
2. ``--kills`` SIGKILLs of ``sip synth`` / ``sip augment`` subprocesses (alternating) at random points inside
   batches: the process is killed once its metadata has grown by a random number of lines (then a
   random 0-150 ms later), so kills land between, inside and around the image writes of a batch;
3. ``--torn`` torn-line injections: after some of those kills, the last line of ``metadata.jsonl`` (or of
   the caption cache ``captions.jsonl``) is cut mid-JSON, as a power loss leaves it;
4. three kills inside the shard merge (``SIP_TEST_KILL_IN_MERGE`` = replaced, marked, cleaning: see
   :mod:`sip.data.bank`) of a ``--shard 1/2`` + ``--shard 2/2`` synth run;
5. a full disk: ``SIP_TEST_ENOSPC_AFTER`` makes a write fail with ENOSPC half-way (no tmpfs needed); the
   CLI must exit with one line naming the folder, leave no temp file, and the rerun must complete.

Then each output folder is checked: images lost (in the reference, not in the metadata), duplicated rows,
torn lines, orphans (image files without a row), images byte-identical to the reference, and the row
counts of ``datasets.load_dataset("imagefolder")`` and ``torchvision.datasets.ImageFolder`` against the
metadata. Prints a table and, as its last line, one JSON object.

    python scripts/fault_inject.py --quick           # ~3 min on one core
    python scripts/fault_inject.py                   # 20 kills, 5 torn lines (~8 min)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def command(mode: str, out: Path, size: int, steps: int, batch: int, shard: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "sip", mode, "--output", str(out), "--steps", str(steps),
           "--set", "progress=false", "--set", f"generate.batch_size={batch}", "--set", "generate.device=cpu"]
    cmd += ["--per-class", str(size)] if mode == "synth" else ["--per-image", "2", "--set", f"source.shots={size}"]
    return cmd + (["--shard", shard] if shard else [])


def env(threads: int, **extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT), **extra}


def run(cmd: list[str], threads: int, log: Path, **extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env(threads, **extra), capture_output=True, text=True, check=False)
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)} {extra}\n-> {proc.returncode}\n{proc.stdout}{proc.stderr[-2000:]}\n")
    return proc


def lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def kill_inside(cmd: list[str], threads: int, meta: Path, total: int, rng: random.Random) -> bool:
    """Start ``cmd`` and SIGKILL it once its metadata grew by a random number of lines; False if it finished."""
    start = lines(meta)
    if total - start < 2:
        return False
    target = start + rng.randint(1, total - start - 1)
    proc = subprocess.Popen(cmd, env=env(threads), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None:
        if lines(meta) >= target:
            time.sleep(rng.uniform(0, 0.15))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.005)
    return False


def tear(path: Path, rng: random.Random) -> bool:
    """Cut the last line of ``path`` mid-JSON (at least 5 bytes, never the whole line)."""
    data = path.read_bytes() if path.is_file() else b""
    last = data[: -1].rfind(b"\n") + 1
    if len(data) - last < 12:
        return False
    path.write_bytes(data[: len(data) - rng.randint(5, len(data) - last - 5)])
    return True


def digests(out: Path) -> dict[str, str]:
    rows = [json.loads(line) for line in (out / "train" / "metadata.jsonl").read_text().splitlines()]
    return {r["file_name"]: hashlib.sha256((out / "train" / r["file_name"]).read_bytes()).hexdigest() for r in rows}


def check(out: Path, reference: dict[str, str], cache: Path) -> dict[str, int]:
    """Lost, duplicated, torn, orphans, identical and the readers' counts of one output folder."""
    import datasets
    from torchvision.datasets import ImageFolder

    meta = out / "train" / "metadata.jsonl"
    raw = meta.read_text(encoding="utf-8").splitlines() if meta.is_file() else []
    rows, torn = [], 0
    for line in raw:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            torn += 1
    names = [r["file_name"] for r in rows]
    files = {p.relative_to(out / "train").as_posix() for p in (out / "train").glob("*/*.png")}
    same = sum(1 for n in set(names) & set(reference) if (out / "train" / n).is_file()
               and hashlib.sha256((out / "train" / n).read_bytes()).hexdigest() == reference[n])
    try:
        n_datasets = len(datasets.load_dataset("imagefolder", data_dir=str(out), split="train", cache_dir=str(cache)))
    except Exception as e:  # noqa: BLE001 - a load failure is a measured outcome
        print(f"datasets failed on {out}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
        n_datasets = -1
    shutil.rmtree(cache, ignore_errors=True)
    return {"rows": len(rows), "images": len(reference), "lost": len(set(reference) - set(names)),
            "duplicated": len(names) - len(set(names)), "torn": torn, "orphans": len(files - set(names)),
            "kept_aside": len(list((out / "train").glob("*/.*.kept-*"))),
            "leftover_tmp": len(list((out / "train").glob("*/.*.tmp"))), "identical": same,
            "datasets": n_datasets, "imagefolder": len(ImageFolder(str(out / "train")))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="8 kills, 3 torn lines, smaller runs")
    p.add_argument("--kills", type=int, default=None, help="SIGKILLs inside batches (default 20, quick 8)")
    p.add_argument("--torn", type=int, default=None, help="torn-line injections (default 5, quick 3)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=Path("/tmp/sip-fault-inject"))
    args = p.parse_args()
    kills = args.kills if args.kills is not None else (8 if args.quick else 20)
    torn_n = args.torn if args.torn is not None else (3 if args.quick else 5)
    size = 3 if args.quick else 6  # images per class (synth) / shots per class (augment, 2 variants each)
    rng = random.Random(args.seed)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    log = args.work / "commands.log"
    cache = args.work / "hf-cache"
    t0 = time.time()

    # 1. references
    refs: dict[str, dict[str, str]] = {}
    for mode in ("synth", "augment"):
        proc = run(command(mode, args.work / f"ref-{mode}", size, args.steps, args.batch), args.threads, log)
        if proc.returncode:
            sys.exit(f"reference {mode} run failed (see {log})")
        refs[mode] = digests(args.work / f"ref-{mode}")

    # 2-3. kills inside batches, torn lines, each followed (eventually) by a resume
    outs = {m: args.work / f"killed-{m}" for m in ("synth", "augment")}
    landed = {"synth": 0, "augment": 0}
    tears = {"metadata.jsonl": 0, "captions.jsonl": 0}
    tear_at = set(rng.sample(range(kills), min(torn_n, kills)))
    for k in range(kills):
        mode = ("synth", "augment")[k % 2]
        out = outs[mode]
        cmd = command(mode, out, size, args.steps, args.batch)
        meta = out / "train" / "metadata.jsonl"
        if lines(meta) >= len(refs[mode]) - 1:  # finished: start this folder again so kills keep landing
            shutil.rmtree(out)
            outs[mode] = out
        if kill_inside(cmd, args.threads, meta, len(refs[mode]), rng):
            landed[mode] += 1
        if k in tear_at:
            target = out / "captions.jsonl" if mode == "augment" and tears["captions.jsonl"] == 0 else meta
            if tear(target, rng):
                tears[target.name] += 1
    results = {}
    for mode, out in outs.items():
        proc = run(command(mode, out, size, args.steps, args.batch), args.threads, log)
        results[f"kills-{mode}"] = {**check(out, refs[mode], cache), "exit": proc.returncode}

    # 4. kills inside the merge
    out = args.work / "merge-synth"
    run(command("synth", out, size, args.steps, args.batch, "1/2"), args.threads, log)
    merge_kills = 0
    for point in ("replaced", "marked", "cleaning"):
        proc = run(command("synth", out, size, args.steps, args.batch, "2/2"), args.threads, log,
                   SIP_TEST_KILL_IN_MERGE=point)
        merge_kills += proc.returncode == -signal.SIGKILL
    proc = run(command("synth", out, size, args.steps, args.batch, "2/2"), args.threads, log)
    # The reference is the same two shards run without a kill: a shard's batches hold other images than
    # a one-process run's, and batched float kernels round by batch (±1 grey level) — that is sharding
    # (byte-equal across process counts only with generate.batch_invariant), not a fault. Both are printed.
    ref_sharded = args.work / "ref-synth-sharded"
    if not (ref_sharded / "train" / "metadata.jsonl").exists():
        for shard in ("1/2", "2/2"):
            run(command("synth", ref_sharded, size, args.steps, args.batch, shard), args.threads, log)
    vs_one_process = check(out, refs["synth"], cache)["identical"]
    results["merge-kills"] = {**check(out, digests(ref_sharded), cache), "exit": proc.returncode}
    print(f"merge-kills: {results['merge-kills']['identical']} identical to the uninterrupted 2-shard run, "
          f"{vs_one_process} to the 1-process run")

    # 5. a full disk (injected ENOSPC on the 2nd image write: run.json, image 1, line 1, image 2)
    out = args.work / "full-disk"
    proc = run(command("synth", out, size, args.steps, args.batch), args.threads, log, SIP_TEST_ENOSPC_AFTER="4")
    message = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    disk_ok = (proc.returncode == 1 and "Traceback" not in proc.stderr and str(out) in message
               and "rerun" in message and not list(out.rglob("*.tmp")))
    proc = run(command("synth", out, size, args.steps, args.batch), args.threads, log)
    results["full-disk"] = {**check(out, refs["synth"], cache), "exit": proc.returncode}

    # the table, then one JSON line
    keys = ["images", "rows", "lost", "duplicated", "torn", "orphans", "kept_aside", "leftover_tmp", "identical",
            "datasets", "imagefolder", "exit"]
    print(f"{'case':<15}" + "".join(f"{k:>13}" for k in keys))
    for case, r in results.items():
        print(f"{case:<15}" + "".join(f"{r[k]:>13}" for k in keys))
    print(f"kills landed inside batches: {landed}; torn lines injected: {tears}; merge kills: {merge_kills}/3; "
          f"full disk: {'clear message, no temp file' if disk_ok else 'FAILED'} ({message[:160]!r})")
    total = {k: sum(r[k] for r in results.values()) for k in ("images", "lost", "duplicated", "torn", "orphans",
                                                                "identical")}
    readers_agree = all(r["rows"] == r["datasets"] == r["imagefolder"] for r in results.values())
    print(json.dumps({"kills": sum(landed.values()), "torn_injected": sum(tears.values()), "merge_kills": merge_kills,
                      "disk_full_clean": disk_ok, **total, "byte_identical": f"{total['identical']}/{total['images']}",
                      "readers_agree_with_metadata": readers_agree, "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    main()
