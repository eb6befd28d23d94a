"""Export a checkpoint's model for serving without stream-cl: TorchScript (or ONNX), label tree, manifest.

The exported model takes the raw batches the learner takes (records as stored, e.g. uint8 NHWC
images) and returns per-level class indices and softmax confidences, as ``Learner.predict`` does;
its ``logits`` method returns the raw per-level logits. ``labels.json`` maps indices to names and
parents, ``manifest.json`` says which checkpoint, stream offsets and input the model belongs to.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import stream_cl
from stream_cl.build import build_learner
from stream_cl.checkpoint import CheckpointError, CheckpointInfo, CheckpointStore
from stream_cl.classifier import Classifier
from stream_cl.errors import StreamClError
from stream_cl.inputs import PIXEL_MEAN, PIXEL_STD

FORMATS = ("torchscript", "onnx")
MODEL_FILES = {"torchscript": "model.pt", "onnx": "model.onnx"}
ONNX_PACKAGES = ("onnx", "onnxscript")
"""What ``torch.onnx.export`` needs; optional, so stream-cl does not depend on them."""


class ExportError(StreamClError):
    """A checkpoint that cannot be exported (nothing learned yet) or a format that is not available."""


class ServingModel(nn.Module):
    """Raw stored batch → ``(classes, confidence)``, both ``(N, levels)``: what ``Classifier.predict`` computes."""

    def __init__(self, classifier: Classifier) -> None:
        super().__init__()
        self.backbone = classifier.backbone
        self.heads = classifier.heads.heads
        self.pixel_mean = PIXEL_MEAN
        self.pixel_std = PIXEL_STD

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """``stream_cl.inputs.to_model_input``, with its constants as attributes so TorchScript can compile it."""
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0).sub_(self.pixel_mean).div_(self.pixel_std)
            if x.dim() == 4:
                x = x.permute(0, 3, 1, 2)
            elif x.dim() == 3:
                x = x.unsqueeze(1)
            return x.contiguous()
        return x.float()

    @torch.jit.export
    def logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per-level logits of a raw stored batch."""
        features = self.backbone(self.prepare(x))
        out: list[torch.Tensor] = []
        for head in self.heads:
            out.append(head(features))
        return out

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        classes: list[torch.Tensor] = []
        confidence: list[torch.Tensor] = []
        for out in self.logits(x):
            conf, cls = out.float().softmax(dim=1).max(dim=1)
            classes.append(cls)
            confidence.append(conf)
        return torch.stack(classes, dim=1), torch.stack(confidence, dim=1)


def find_checkpoint(path: Path) -> tuple[CheckpointInfo, dict[str, Any]]:
    """The verified checkpoint at ``path``: a checkpoint file, or the newest valid one in a directory."""
    if path.is_dir():
        found = CheckpointStore(path).latest()
        if found is None:
            raise CheckpointError(f"no valid checkpoint in {path}")
        return found
    if not path.is_file():
        raise CheckpointError(f"no such checkpoint file or directory: {path}")
    store = CheckpointStore(path.parent)
    for info in store.list():
        if info.path.name == path.name:
            return info, store.load(info)
    raise CheckpointError(f"{path.name} is not named like a checkpoint (ckpt-<id>-<digest>.pt)")


def serving_model(payload: dict[str, Any]) -> ServingModel:
    """The checkpoint's model (backbone and heads) in eval mode, on the CPU.

    Only the model and label tree are loaded: optimizer, buffer and RNG states matter for learning,
    not for serving, and a Redis buffer's state refers to a server the export does not need.
    """
    identity = payload["identity"]
    learner = build_learner(
        identity["method"],
        identity["model"],
        tuple(payload["input_shape"]),
        np.dtype(payload["input_dtype"]),
        device=torch.device("cpu"),
        width=identity["width"],
    )
    classifier: Classifier = learner.model
    state = payload["learner"]
    classifier.tree.load_state_dict(state["labels"])
    if not classifier.tree.depth:
        raise ExportError(f"checkpoint {payload['id']} has learned no class yet: nothing to export")
    classifier.sync()
    classifier.load_state_dict(state["model"])
    # no autograd graph for callers who forget torch.no_grad(): serving never trains
    return ServingModel(classifier).eval().requires_grad_(False)


def export_checkpoint(source: Path, out: Path, fmt: str = "torchscript") -> dict[str, Any]:
    """Write ``model.pt`` (or ``model.onnx``), ``labels.json`` and ``manifest.json`` under ``out``.

    Returns the manifest. The manifest is written last, so a directory with one is complete.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None] if fmt == "onnx" else []
    if missing:
        raise ExportError(
            f"--format onnx needs {' and '.join(missing)} (pip install {' '.join(ONNX_PACKAGES)}); "
            "the default TorchScript format needs nothing extra"
        )
    info, payload = find_checkpoint(source)
    model = serving_model(payload)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)  # an earlier export's manifest must not vouch for new files
    model_path = out / MODEL_FILES[fmt]
    if fmt == "torchscript":
        # TorchScript is deprecated in favour of torch.export, but it is what C++ (LibTorch) and every
        # torch release load today; the export test proves the file works.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r"`torch\.jit\.script` is deprecated", DeprecationWarning)
            torch.jit.script(model).save(str(model_path))
    else:
        # two rows: an example batch of one would fix the batch dimension at 1
        example = torch.zeros((2, *payload["input_shape"]), dtype=getattr(torch, payload["input_dtype"]))
        try:
            torch.onnx.export(
                model,
                (example,),
                str(model_path),
                input_names=["x"],
                output_names=["classes", "confidence"],
                dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
                external_data=False,  # one self-contained file, so the manifest's digest covers every weight
                verbose=False,
            )
        except Exception as err:  # the ONNX exporter raises many types, none of them ours
            raise ExportError(f"ONNX export failed: {err}") from err
    labels = payload["learner"]["labels"]
    (out / "labels.json").write_text(json.dumps(label_tree(labels), indent=1) + "\n")
    manifest = {
        "stream_cl_version": stream_cl.__version__,
        "format": fmt,
        "model_file": model_path.name,
        "model_sha256": hashlib.sha256(model_path.read_bytes()).hexdigest(),
        "labels_file": "labels.json",
        **payload["identity"],
        "input": {"shape": list(payload["input_shape"]), "dtype": payload["input_dtype"], "batched": True},
        "outputs": {
            "forward": "(classes int64 (N, levels), confidence float32 (N, levels)): argmax and softmax max per level",
            "logits": "list of per-level float32 logits (N, classes of level); TorchScript only",
        },
        "checkpoint": {
            "id": payload["id"],
            "file": info.path.name,
            "created": _iso(payload["created"]),
        },
        "offsets": [{"topic": t, "partition": p, "next_offset": o} for t, p, o in payload["offsets"]],
        "learned_total": payload["learned_total"],
        "exported_at": _iso(time.time()),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def label_tree(labels: dict[str, Any]) -> dict[str, Any]:
    """The label tree as JSON: per level, class names by index and each class's parent index (-1 at level 0)."""
    return {
        "levels": [
            {"level": level, "classes": list(names), "parents": list(parents)}
            for level, (names, parents) in enumerate(zip(labels["names"], labels["parents"], strict=True))
        ]
    }


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))
