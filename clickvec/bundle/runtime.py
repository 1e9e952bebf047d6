"""The step session: one ONNX Runtime session of the step graph, its provider choice
(CUDA when it initialises, else CPU) and the shape checks of its inputs."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from clickvec.bundle.format import IN_H, STEP_INPUTS, STEP_IO, STEP_OUTPUTS, BundleError

log = logging.getLogger(__name__)

Array = np.ndarray
StepResult = tuple[Array, Array, Array, Array, Array]  # h, c, z_seq, z_last, surprise


@dataclass(frozen=True)
class RuntimeConfig:
    """How the step graph runs. `providers`: "auto" (CUDA when it initialises, else CPU),
    "cpu", "cuda", or an explicit ORT provider list. `intra_op_threads` 0 = ORT default
    (one per physical core). `allow_spinning` False frees the cores between calls, for
    workers that share them with a Kafka client."""

    providers: str | tuple[str, ...] = "auto"
    intra_op_threads: int = 0
    allow_spinning: bool = True
    io_binding: bool | None = None  # None: on for CUDA, off for CPU
    warmup: bool = True


def _session_options(cfg: RuntimeConfig, quiet: bool = False) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # one chain of ops: inter-op threads idle
    so.inter_op_num_threads = 1
    so.intra_op_num_threads = max(0, int(cfg.intra_op_threads))
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if cfg.allow_spinning else "0")
    if quiet:
        so.log_severity_level = 4  # a CUDA EP that fails to start is expected on CPU hosts
    return so


_cuda_failure: str | None = None  # why CUDA did not start in this process; not retried under "auto"


def _nvidia_device_present() -> bool:
    """Cheap check before asking ORT for CUDA, which logs a loud error when it cannot."""
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia/version")


def _make_session(model: bytes, cfg: RuntimeConfig) -> ort.InferenceSession:
    global _cuda_failure
    want = cfg.providers
    available = ort.get_available_providers()
    if isinstance(want, str):
        want = want.lower()
        if want not in ("auto", "cpu", "cuda"):
            raise ValueError(f"providers must be auto, cpu, cuda or a list, not {want!r}")
        if want == "auto" and _cuda_failure is None and not _nvidia_device_present():
            _cuda_failure = "no NVIDIA device is visible (/dev/nvidiactl)"
            log.info("CUDAExecutionProvider not tried: %s; using CPU", _cuda_failure)
        try_cuda = want == "cuda" or (
            want == "auto" and "CUDAExecutionProvider" in available and _cuda_failure is None
        )
        if try_cuda:
            try:
                sess = ort.InferenceSession(
                    model,
                    sess_options=_session_options(cfg, quiet=want == "auto"),
                    providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
                )
                if sess.get_providers()[0] == "CUDAExecutionProvider":
                    return sess
                why = "it did not initialise (no usable GPU or CUDA libraries)"
            except Exception as e:  # ORT raises plain RuntimeError/Fail for EP failures
                why = f"it failed to start: {e}"
            _cuda_failure = why
            if want == "cuda":
                raise BundleError(f"CUDAExecutionProvider requested but {why}; use providers='cpu'")
            log.info("CUDAExecutionProvider is installed but %s; using CPU", why)
        return ort.InferenceSession(model, sess_options=_session_options(cfg), providers=["CPUExecutionProvider"])
    return ort.InferenceSession(model, sess_options=_session_options(cfg), providers=list(want))


class StepSession:
    """One ONNX Runtime session over a step graph, fed and read by the format's I/O names.

    Used by `Bundle` and by export's parity checks, so both run the exact same code."""

    def __init__(self, model: bytes, cfg: RuntimeConfig = RuntimeConfig()) -> None:
        self.cfg = cfg
        self.session = _make_session(model, cfg)
        self.providers: list[str] = self.session.get_providers()
        self.on_cuda = self.providers[0] == "CUDAExecutionProvider"
        self.io_binding = self.on_cuda if cfg.io_binding is None else cfg.io_binding
        names_in = tuple(i.name for i in self.session.get_inputs())
        names_out = tuple(o.name for o in self.session.get_outputs())
        if set(names_in) != set(STEP_INPUTS) or set(names_out) != set(STEP_OUTPUTS):
            raise BundleError(
                f"step graph has inputs {names_in} / outputs {names_out}, this clickvec expects "
                f"{STEP_INPUTS} / {STEP_OUTPUTS}: re-export the model with this clickvec version"
            )
        shape = self.session.get_inputs()[names_in.index(IN_H)].shape  # [L, "B", H]
        self.layers, self.hidden = int(shape[0]), int(shape[2])

    def run(
        self, items: Array, etypes: Array, gaps: Array, lengths: Array, h: Array, c: Array
    ) -> StepResult:
        feeds: dict[str, Array] = {
            name: np.ascontiguousarray(x, dtype=STEP_IO[name][0])
            for name, x in zip(STEP_INPUTS, (items, etypes, gaps, lengths, h, c), strict=True)
        }
        _check_shapes(*feeds.values(), self.layers, self.hidden)
        if self.io_binding:
            # Inputs copied to the device once, outputs allocated there by ORT and copied
            # back in STEP_OUTPUTS order (the order they are bound in).
            binding = self.session.io_binding()
            for name, value in feeds.items():
                binding.bind_cpu_input(name, value)
            device = "cuda" if self.on_cuda else "cpu"
            for name in STEP_OUTPUTS:
                binding.bind_output(name, device)
            self.session.run_with_iobinding(binding)
            out = binding.copy_outputs_to_cpu()
        else:
            out = self.session.run(list(STEP_OUTPUTS), feeds)
        h_new, c_new, z_seq, z_last, surprise = out
        return h_new, c_new, z_seq, z_last, surprise


def _check_shapes(
    items: Array, etypes: Array, gaps: Array, lengths: Array, h: Array, c: Array, layers: int, hidden: int
) -> None:
    if items.ndim != 2 or items.shape[0] < 1 or items.shape[1] < 1:
        raise ValueError(f"items must be (T, B) with T, B >= 1, got {items.shape}")
    T, B = items.shape
    if etypes.shape != (T, B) or gaps.shape != (T, B):
        raise ValueError(f"items, etypes, gaps must share shape (T, B) = {(T, B)}")
    if lengths.shape != (B,) or lengths.min() < 1 or lengths.max() > T:
        raise ValueError(f"lengths must be (B,) = ({B},) with 1 <= lengths <= T = {T}")
    if h.shape != (layers, B, hidden) or c.shape != (layers, B, hidden):
        raise ValueError(f"h and c must be (L, B, H) = {(layers, B, hidden)}, got {h.shape}, {c.shape}")
