"""One ONNX GPU stage under onnxruntime, as a callable: tensors in, tensors out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def onnx_stage(path: str | Path, providers: list[str] | None = None) -> Any:
    """A callable running one ONNX GPU stage under onnxruntime: tensors in, tensors out."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=providers or ["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feeds = {n: a.detach().cpu().numpy() for n, a in zip(names, args, strict=True)}
        return tuple(torch.from_numpy(o) for o in session.run(None, feeds))

    return run
