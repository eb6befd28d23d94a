"""``stream-cl checkpoint ls | show | restore | export``: inspect a checkpoint directory, roll back to a
checkpoint, export a checkpoint's model for serving elsewhere."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("checkpoint", help="list, show or restore service checkpoints")
    actions = p.add_subparsers(dest="action", required=True)
    ls = actions.add_parser("ls", help="list checkpoints (newest last) and whether each verifies")
    ls.add_argument("dir", type=Path, help="checkpoint directory")
    show = actions.add_parser("show", help="print one checkpoint's metadata as JSON (default: newest valid)")
    show.add_argument("dir", type=Path)
    show.add_argument("id", type=int, nargs="?", default=None)
    restore = actions.add_parser(
        "restore",
        help="make checkpoint ID the one the service starts from (re-written as the newest; history is kept)",
    )
    restore.add_argument("dir", type=Path)
    restore.add_argument("id", type=int)
    export = actions.add_parser(
        "export",
        help="write a checkpoint's model (TorchScript or ONNX), label tree and manifest for serving without stream-cl",
    )
    export.add_argument("source", type=Path, help="checkpoint file, or directory (its newest valid checkpoint)")
    export.add_argument("--out", type=Path, required=True, help="directory to write the export to")
    export.add_argument("--format", default="torchscript", help="model file format: torchscript (default) or onnx")
    p.set_defaults(handler=cmd_checkpoint)


def cmd_checkpoint(args: argparse.Namespace) -> int:
    from stream_cl.checkpoint import CheckpointError, CheckpointStore  # here: parsing and --help need no torch
    from stream_cl.export import export_checkpoint

    if args.action == "export":
        manifest = export_checkpoint(args.source, args.out, args.format)
        print(
            f"checkpoint {manifest['checkpoint']['id']} ({manifest['learned_total']} records learned) exported "
            f"to {args.out}: {manifest['model_file']}, {manifest['labels_file']}, manifest.json"
        )
        return 0
    if not args.dir.is_dir():
        raise CheckpointError(f"not a directory: {args.dir}")
    # keep=large: inspecting or restoring never prunes what the service kept
    store = CheckpointStore(args.dir, keep=1_000_000)
    if args.action == "ls":
        print(f"{'id':>6}  {'created (UTC)':19}  {'bytes':>10}  {'learned':>9}  status")
        for info in store.list():
            try:
                payload = store.load(info)
                created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(payload["created"]))
                print(f"{info.id:>6}  {created:19}  {info.size:>10}  {payload['learned_total']:>9}  ok")
            except CheckpointError as err:
                print(f"{info.id:>6}  {'-':19}  {info.size:>10}  {'-':>9}  INVALID: {err}")
        return 0
    if args.action == "show":
        if args.id is None:
            found = store.latest()
            if found is None:
                raise CheckpointError(f"no valid checkpoint in {args.dir}")
            info, payload = found
        else:
            info = store.get(args.id)
            payload = store.load(info)
        print(json.dumps(describe(payload, info.path), indent=2))
        return 0
    # a restore writes: it takes the directory's lock (refused while a service runs there), ls and show need none
    with CheckpointStore(args.dir, keep=1_000_000, sweep=True) as writer:
        info = writer.get(args.id)
        payload = writer.load(info)
        payload = {k: v for k, v in payload.items() if k not in ("format", "id", "created")}
        new = writer.write(payload)
    print(f"checkpoint {args.id} restored as {new.id} ({new.path.name}); the service resumes from it on start")
    return 0


def describe(payload: dict[str, Any], path: Path) -> dict[str, Any]:
    """The human-relevant part of a checkpoint: identity, progress, offsets, label tree, sizes."""
    from stream_cl.pending import pending_counts  # imports torch: not at start-up (a checkpoint is loaded already)

    learner = payload["learner"]
    labels = learner.get("labels", {})
    model = learner.get("model", {})
    pending = payload.get("pending")  # delayed labels (--labels): samples and labels waiting to join
    return {
        "id": payload["id"],
        "file": str(path),
        "format": payload["format"],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(payload["created"])),
        **payload["identity"],
        "input": {"shape": payload["input_shape"], "dtype": payload["input_dtype"]},
        "learned_total": payload["learned_total"],
        "offsets": [{"topic": t, "partition": p, "next_offset": o} for t, p, o in payload["offsets"]],
        "classes_per_level": [len(names) for names in labels.get("names", [])],
        "parameters": int(sum(t.numel() for t in model.values() if hasattr(t, "numel"))),
        "buffer_size": int(learner["buffer"]["size"]) if "size" in learner.get("buffer", {}) else None,
        "pending": None if pending is None else dict(zip(("samples", "labels"), pending_counts(pending), strict=True)),
    }
