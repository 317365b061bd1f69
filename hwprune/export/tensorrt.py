"""Optional native TensorRT engine from an exported candidate's ``model.onnx``.

``tensorrt`` is imported inside :func:`build_engine` only, so ``import hwprune`` (and every CPU path)
works without it. An engine is specific to the GPU model and the TensorRT version that built it, so
it is written beside the ONNX file rather than shipped; the ONNX file stays the portable artefact.

Dynamic axes: the exported encoder has dynamic batch and sequence; TensorRT needs one optimisation
profile giving min/opt/max for every dynamic input. ``opt`` is the shape the candidate was measured
at, so the engine is tuned for the case the manifest reports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hwprune._io import atomic_path
from hwprune.errors import HwpruneError

__all__ = ["build_engine", "TRT_MISSING"]

TRT_MISSING = "TensorRT is not installed; pip install hwprune[tensorrt] on a machine with an NVIDIA GPU"


def _import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError:
        raise HwpruneError(TRT_MISSING) from None
    return tensorrt


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path | None = None,
    *,
    batch: int = 1,
    seq: int = 128,
    max_batch: int | None = None,
    max_seq: int | None = None,
    fp16: bool = False,
    workspace_gib: float = 4.0,
) -> Path:
    """Build a serialized TensorRT engine (``model.plan`` beside the ONNX file unless told otherwise).

    Every dynamic input gets the profile min (1, 1), opt (``batch``, ``seq``), max (``max_batch``,
    ``max_seq``), defaulting max to opt. Returns the engine path; parse and build errors are one line.
    """
    trt = _import_tensorrt()
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise HwpruneError(f"{onnx_path} does not exist; export the candidate first (hwprune export)")
    engine_path = Path(engine_path) if engine_path is not None else onnx_path.with_suffix(".plan")
    max_batch, max_seq = max_batch or batch, max_seq or seq
    if not (1 <= batch <= max_batch and 1 <= seq <= max_seq):
        raise HwpruneError(
            f"engine shapes need 1 <= batch <= max_batch and 1 <= seq <= max_seq "
            f"(got batch={batch}/{max_batch}, seq={seq}/{max_seq})"
        )

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 10 networks are always explicit-batch; older versions need the flag.
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        first = parser.get_error(0).desc() if parser.num_errors else "unknown error"
        raise HwpruneError(f"{onnx_path}: TensorRT cannot parse the ONNX graph ({first})")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if fp16:
        if not builder.platform_has_fast_fp16:
            raise HwpruneError("this GPU has no fast FP16; build without fp16")
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        inp = network.get_input(i)
        shape = tuple(inp.shape)
        if any(d == -1 for d in shape):  # (batch, seq) inputs of the encoder export
            pick = lambda b, s: tuple(b if j == 0 else s if j == 1 else d for j, d in enumerate(shape))  # noqa: E731, B023 (used at once)
            profile.set_shape(inp.name, pick(1, 1), pick(batch, seq), pick(max_batch, max_seq))
    config.add_optimization_profile(profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise HwpruneError(f"{onnx_path}: TensorRT engine build failed (see the TensorRT log above)")
    with atomic_path(engine_path) as tmp:
        tmp.write_bytes(bytes(serialized))
    return engine_path
