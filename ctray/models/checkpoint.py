"""Self-describing model checkpoints: weights plus what is needed to rebuild and feed the model.

One file per model (local path or ``s3://`` / ``gs://`` URI), a plain dict that ``torch.load(...,
weights_only=True)`` accepts (tensors, strings, numbers, lists: no pickled code)::

    {"format": "ctray-model/1",
     "spec": {"arch", "in_channels", "num_classes", "image_size", "mean", "std"},
     "state_dict": {...},
     "extra": {...}}          # JSON-safe provenance: what trained it, on what, round, ...

Every checkpoint ctray writes uses it: ``ctray train``'s output, and the run directory's
``checkpoints/round_r/{fbase,base,confused}.pt``. :func:`load_state` also reads a bare state dict (what
``torch.save(model.state_dict())`` writes) so that users can bring weights trained elsewhere, given
the spec on the command line.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ctray import io as cio
from ctray.errors import DataError

FORMAT = "ctray-model/1"

__all__ = ["FORMAT", "ModelSpec", "load_model", "load_state", "read_checkpoint", "save_model"]


@dataclass(frozen=True)
class ModelSpec:
    """How to rebuild a model and prepare its input.

    Attributes:
        arch: registry name (``ctray.models.list_models()``).
        in_channels: 1 (grey) or 3 (RGB).
        num_classes: logits, >= 2.
        image_size: input side in pixels (square).
        mean, std: input normalisation ``(x/255 - mean) / std`` of uint8 pixels.
    """

    arch: str
    in_channels: int
    num_classes: int
    image_size: int
    mean: float = 0.5
    std: float = 0.25

    def build(self) -> nn.Module:
        """A fresh, randomly initialised model of this spec."""
        from ctray.models import build_model

        return build_model(self.arch, self.in_channels, self.num_classes, self.image_size)


def _plain_state(model_or_state: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(model_or_state, nn.Module):
        m = getattr(model_or_state, "module", model_or_state)  # unwrap DDP
        model_or_state = m.state_dict()
    return {k: v.detach().cpu().clone() for k, v in model_or_state.items()}


def save_model(path: str, model_or_state: nn.Module | dict[str, torch.Tensor], spec: ModelSpec,
               extra: dict[str, Any] | None = None) -> str:
    """Write a checkpoint of ``model_or_state`` (a module, DDP-wrapped or not, or a state dict) to
    ``path``; returns the SHA-256 (hex) of the bytes written, for a reference that must find the same
    file later (:func:`read_checkpoint`'s ``sha256``)."""
    raw = model_bytes(model_or_state, spec, extra)
    cio.write_bytes(path, raw)
    return hashlib.sha256(raw).hexdigest()


def model_bytes(model_or_state: nn.Module | dict[str, torch.Tensor], spec: ModelSpec,
                extra: dict[str, Any] | None = None) -> bytes:
    """The bytes :func:`save_model` writes (a ctray checkpoint file), for a caller that stores them itself."""
    blob = {"format": FORMAT, "spec": asdict(spec), "state_dict": _plain_state(model_or_state),
            "extra": dict(extra or {})}
    buf = io.BytesIO()
    torch.save(blob, buf)
    return buf.getvalue()


def read_checkpoint(path: str, sha256: str | None = None) -> dict[str, Any]:
    """Load a checkpoint file as its dict (``weights_only=True``: no code runs).

    Returns ``{"format", "spec" (dict or None), "state_dict", "extra"}``; a bare state dict comes back
    with ``format=None`` and ``spec=None``.

    Raises:
        DataError: the file is missing, is not a torch checkpoint, or (with ``sha256``) has other bytes.
    """
    try:
        raw = cio.read_bytes(path)
    except (FileNotFoundError, OSError) as e:
        raise DataError(f"model checkpoint {path} cannot be read: {e}") from e
    if sha256 is not None and hashlib.sha256(raw).hexdigest() != sha256:
        raise DataError(f"model checkpoint {path} is not the file that was referenced (SHA-256 "
                        f"{hashlib.sha256(raw).hexdigest()[:12]}..., expected {sha256[:12]}...): it was "
                        "rewritten or damaged since")
    try:
        obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for non-checkpoint bytes
        raise DataError(f"{path} is not a torch checkpoint loadable with weights_only=True: {e}") from e
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        return {"format": FORMAT, "spec": obj["spec"], "state_dict": obj["state_dict"], "extra": obj.get("extra", {})}
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"format": None, "spec": None, "state_dict": obj, "extra": {}}
    raise DataError(f"{path}: neither a ctray model checkpoint ({FORMAT}) nor a state dict")


def load_state(path: str, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict of a checkpoint file (either format); with ``sha256``, only if the file's bytes
    have that digest (else DataError)."""
    return read_checkpoint(path, sha256)["state_dict"]  # type: ignore[no-any-return]


def load_model(path: str, spec: ModelSpec | None = None) -> tuple[nn.Module, ModelSpec, dict[str, Any]]:
    """Rebuild the model of a checkpoint, in eval mode on the CPU.

    Args:
        path: local path or URI of a checkpoint.
        spec: required for a bare state dict; overrides nothing for a ctray checkpoint (a mismatch
            raises).

    Returns:
        ``(model, spec, extra)``.

    Raises:
        DataError: unreadable file, a bare state dict without ``spec``, or weights that do not fit.
    """
    ck = read_checkpoint(path)
    if ck["spec"] is not None:
        file_spec = ModelSpec(**ck["spec"])
        if spec is not None and spec != file_spec:
            raise DataError(f"{path}: checkpoint spec {file_spec} differs from the requested {spec}")
        spec = file_spec
    if spec is None:
        raise DataError(f"{path} is a bare state dict: give the architecture, channels, classes and image size")
    model = spec.build()
    try:
        model.load_state_dict(ck["state_dict"])
    except RuntimeError as e:
        raise DataError(f"{path}: weights do not fit {spec.arch} ({spec.in_channels} ch, {spec.num_classes} "
                        f"classes): {str(e)[:300]}") from e
    model.eval()
    return model, spec, ck["extra"]
