"""``stream-cl checkpoint export``: the exported model, loaded by torch alone, predicts what the learner predicts."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from functools import partial
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from consumers.recorded import RecordedSource, write_messages
from monitoring.metrics import Metrics
from monitoring.probe import ProbeSet
from stream_cl import export
from stream_cl.build import build_learner
from stream_cl.checkpoint import CheckpointStore
from stream_cl.checkpointer import Checkpointer
from stream_cl.cli import main
from stream_cl.run import RunOptions, RunParts, run_stream
from tests.streams import blob_arrays, messages

# Coarse then fine: two levels, so the export carries two heads and a parent map.
PATHS = {0: ["even", "c0"], 1: ["odd", "c1"], 2: ["even", "c2"], 3: ["odd", "c3"]}

# Runs with site processing off (-S), so the editable install's path hook is never installed, and
# only torch's own site-packages directory on sys.path: stream_cl must not be importable.
LOADER = textwrap.dedent(
    """
    import sys
    sys.path.append(sys.argv[1])
    try:
        import stream_cl
    except ImportError:
        pass
    else:
        raise SystemExit(f"stream_cl is importable from {stream_cl.__file__}")
    import torch
    model = torch.jit.load(sys.argv[2] + "/model.pt")
    x = torch.load(sys.argv[3], weights_only=True)
    classes, confidence = model(x)
    assert not confidence.requires_grad
    torch.save({"classes": classes, "confidence": confidence, "logits": model.logits(x)}, sys.argv[4])
    """
)


def _learn(tmp_path: Path, model: str, shape: tuple[int, ...], images: bool) -> tuple[object, torch.Tensor]:
    """Learn a small hierarchical stream with checkpoints in ``tmp_path/ckpt``; the learner and the inputs."""
    x, y = blob_arrays(n_classes=4, per_class=30, shape=shape, images=images, seed=1)
    stream = tmp_path / "s.rec.gz"
    write_messages(stream, messages(x, y, paths=PATHS))
    make = partial(build_learner, "er", model, device=torch.device("cpu"), seed=0, buffer_size=40, width=8)
    identity = {"method": "er", "model": model, "width": 8}
    probe = ProbeSet(fraction=0.0, seed=0)
    checkpointer = Checkpointer(CheckpointStore(tmp_path / "ckpt"), identity=identity, every_records=50, probe=probe)
    with RecordedSource(stream) as source:
        _, state = run_stream(
            source,
            make,
            Metrics(CollectorRegistry()),
            RunOptions(batch_size=10, progress=False),
            RunParts(probe, checkpointer=checkpointer),
        )
    return state.learner, torch.from_numpy(x)


@pytest.mark.parametrize(
    ("model", "shape", "images"), [("mlp", (8,), False), ("resnet18-reduced", (8, 8, 3), True)], ids=["mlp", "resnet"]
)
def test_export_reproduces_the_learner_without_stream_cl(
    tmp_path: Path, model: str, shape: tuple[int, ...], images: bool
) -> None:
    learner, x = _learn(tmp_path, model, shape, images)
    out = tmp_path / "export"
    assert main(["checkpoint", "export", str(tmp_path / "ckpt"), "--out", str(out)]) == 0

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model_sha256"] == hashlib.sha256((out / "model.pt").read_bytes()).hexdigest()
    assert (manifest["method"], manifest["model"], manifest["width"]) == ("er", model, 8)
    assert manifest["input"] == {"shape": list(shape), "dtype": "uint8" if images else "float32", "batched": True}
    assert manifest["offsets"] == [{"topic": "test", "partition": 0, "next_offset": 120}]
    # how many checkpoints the cadence wrote depends on how fast the disk was; the export is of the newest
    newest_id = CheckpointStore(tmp_path / "ckpt").list()[-1].id
    assert manifest["learned_total"] == 120 and manifest["checkpoint"]["id"] == newest_id
    labels = json.loads((out / "labels.json").read_text())["levels"]
    assert labels[0] == {"level": 0, "classes": ["even", "odd"], "parents": [-1, -1]}
    assert labels[1] == {"level": 1, "classes": ["c0", "c1", "c2", "c3"], "parents": [0, 1, 0, 1]}

    inputs, outputs, elsewhere = tmp_path / "inputs.pt", tmp_path / "outputs.pt", tmp_path / "elsewhere"
    elsewhere.mkdir()
    torch.save(x, inputs)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    torch_site = str(Path(torch.__file__).resolve().parents[1])
    done = subprocess.run(
        [sys.executable, "-S", "-c", LOADER, torch_site, str(out), str(inputs), str(outputs)],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr

    served = torch.load(outputs, weights_only=True)
    expected = learner.predict(x)
    assert torch.equal(served["classes"], expected.classes)
    assert torch.allclose(served["confidence"], expected.confidence, atol=1e-6)
    assert [t.shape[1] for t in served["logits"]] == [2, 4]
    assert torch.equal(torch.stack([t.argmax(dim=1) for t in served["logits"]], dim=1), served["classes"])


def test_export_of_a_single_checkpoint_file_and_format_errors(tmp_path: Path) -> None:
    _learn(tmp_path, "mlp", (8,), False)
    first = CheckpointStore(tmp_path / "ckpt").list()[0]
    in_flight = tmp_path / "ckpt" / ".ckpt-being-written.tmp"  # a running service's next checkpoint
    in_flight.write_bytes(b"half")
    manifest = export.export_checkpoint(first.path, tmp_path / "first")
    assert manifest["checkpoint"] == {
        "id": first.id,
        "file": first.path.name,
        "created": manifest["checkpoint"]["created"],
    }
    assert manifest["learned_total"] == 50
    newest = export.export_checkpoint(tmp_path / "ckpt", tmp_path / "first")  # re-export into the same folder
    assert json.loads((tmp_path / "first" / "manifest.json").read_text()) == newest
    # a write still in flight at 100 records makes the final checkpoint the second, not the third
    newest_id = CheckpointStore(tmp_path / "ckpt").list()[-1].id
    assert newest_id > first.id and newest["checkpoint"]["id"] == newest_id and newest["learned_total"] == 120
    assert in_flight.exists()  # exporting never touches what a service is writing

    with pytest.raises(export.ExportError, match="unknown export format"):
        export.export_checkpoint(first.path, tmp_path / "x", "pickle")
    not_a_checkpoint = tmp_path / "model.pt"
    not_a_checkpoint.write_bytes(b"x")
    assert main(["checkpoint", "export", str(not_a_checkpoint), "--out", str(tmp_path / "y")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["checkpoint", "export", str(tmp_path / "empty"), "--out", str(tmp_path / "y")]) == 2
    assert not (tmp_path / "y").exists()


def test_onnx_without_the_onnx_package_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = export.importlib.util.find_spec
    monkeypatch.setattr(export.importlib.util, "find_spec", lambda name: None if name == "onnx" else real(name))
    with pytest.raises(export.ExportError, match=r"needs onnx .*pip install onnx onnxscript"):
        export.export_checkpoint(tmp_path, tmp_path / "out", "onnx")


def test_a_checkpoint_that_learned_nothing_is_refused(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "ckpt")
    learner = build_learner("er", "mlp", (8,), torch.zeros(1).numpy().dtype, device=torch.device("cpu"), width=8)
    store.write(
        {
            "identity": {"method": "er", "model": "mlp", "width": 8},
            "input_shape": [8],
            "input_dtype": "float32",
            "offsets": [],
            "learned_total": 0,
            "learner": learner.state_dict(),
            "probe": None,
        }
    )
    with pytest.raises(export.ExportError, match="learned no class"):
        export.export_checkpoint(tmp_path / "ckpt", tmp_path / "out")
