"""The ONNX step graph, built by hand from an `Encoder`'s weights.

Why by hand rather than `torch.onnx.export`: the step graph must take per-user lengths
(`sequence_lens` on the native ONNX `LSTM` op) so that one call can carry a ragged batch
of users at different positions, and each user's returned state is its state after its
own last valid event. The traced exporter has no notion of that; the op itself does.

Semantics (equal to `Encoder.step` for equal lengths, see tests/test_export.py):
    x_t       = [item_emb[item_t], type_emb[etype_t], gap_emb[gap_t]]
    y, h, c   = LSTM_L(... LSTM_1(x, h_in[0], c_in[0]) ...)     per user up to lengths[b]
    z_seq     = z_head(y)                                          (T, B, D)
    z_last    = z_head(h[top])                                     (B, D)
    z_prev    = [z_head(h_in[top]), z_seq[:-1]]                    (T, B, D)
    surprise  = -log_softmax(item_proj(z_prev) @ item_emb^T + item_bias)[item_t]
                -log_softmax(type_head(z_prev))[etype_t]                  (T, B)

The surprise scores the whole observed event, item and event type, each with its own
log-softmax: -log p(item_t | z_{t-1}) - log p(event_type_t | z_{t-1}). A payment right
after a payment, or an item in a category the user never touched, are both improbable.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from clickvec.bundle.format import (
    IN_C,
    IN_ETYPE,
    IN_GAP,
    IN_H,
    IN_ITEM,
    IN_LENGTHS,
    OUT_C,
    OUT_H,
    OUT_SURPRISE,
    OUT_Z_LAST,
    OUT_Z_SEQ,
    STEP_INPUTS,
    STEP_OUTPUTS,
    step_io,
)
from clickvec.training.model import Encoder

OPSET = 17  # LSTM-14, LogSoftmax-13, GatherElements-13: all mature in ORT's CPU and CUDA EPs
IR_VERSION = 8  # the IR that goes with opset 17; readable by every ORT since 1.11

# PyTorch packs LSTM gates as (i, f, g, o); ONNX as (i, o, f, c) with c == g.
_TORCH_TO_ONNX_GATES = (0, 3, 1, 2)


def _reorder_gates(w: np.ndarray, hidden: int) -> np.ndarray:
    """(4H, ...) in PyTorch gate order -> (4H, ...) in ONNX gate order."""
    blocks = [w[k * hidden : (k + 1) * hidden] for k in _TORCH_TO_ONNX_GATES]
    return np.concatenate(blocks, axis=0)


def encoder_weights(model: Encoder) -> dict[str, np.ndarray]:
    """Every float32 array the step graph needs, in ONNX layouts."""
    cfg = model.cfg
    sd = {k: v.detach().cpu().to(torch.float32).numpy() for k, v in model.state_dict().items()}
    H = cfg.hidden
    w: dict[str, np.ndarray] = {
        "item_emb": sd["item_emb.weight"],  # (N, Ei)
        "type_emb": sd["type_emb.weight"],  # (Ne, Et)
        "gap_emb": sd["gap_emb.weight"],  # (Ng, Eg)
        "z_head_wT": sd["z_head.weight"].T,  # (H, D)
        "z_head_b": sd["z_head.bias"],  # (D,)
        "item_proj_wT": sd["item_proj.weight"].T,  # (D, Ei)
        "item_proj_b": sd["item_proj.bias"],  # (Ei,)
        "item_bias": sd["item_bias"],  # (N,)
        "type_head_wT": sd["type_head.weight"].T,  # (D, Ne)
        "type_head_b": sd["type_head.bias"],  # (Ne,)
    }
    for layer in range(cfg.layers):
        w_ih = sd[f"lstm.weight_ih_l{layer}"]  # (4H, in)
        w_hh = sd[f"lstm.weight_hh_l{layer}"]  # (4H, H)
        b_ih = sd.get(f"lstm.bias_ih_l{layer}", np.zeros(4 * H, np.float32))
        b_hh = sd.get(f"lstm.bias_hh_l{layer}", np.zeros(4 * H, np.float32))
        w[f"lstm{layer}_W"] = _reorder_gates(w_ih, H)[None]  # (1, 4H, in)
        w[f"lstm{layer}_R"] = _reorder_gates(w_hh, H)[None]  # (1, 4H, H)
        w[f"lstm{layer}_B"] = np.concatenate([_reorder_gates(b_ih, H), _reorder_gates(b_hh, H)])[None]  # (1, 8H)
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in w.items()}


def build_step_graph(
    model: Encoder,
    weight_dtype: str = "float32",
    weights: dict[str, np.ndarray] | None = None,
) -> onnx.ModelProto:
    """The step graph as an ONNX model (opset `OPSET`, dynamic T and B).

    `weight_dtype="float16"` stores every float weight as float16 and casts it back to
    float32 inside the graph: half the file, identical float32 compute on every EP (ORT
    constant-folds the casts at session start). Inputs and outputs stay float32.
    `weights` overrides `encoder_weights(model)` (tests corrupt one on purpose).
    """
    cfg = model.cfg
    if weight_dtype not in ("float32", "float16"):
        raise ValueError(f"weight_dtype must be float32 or float16, not {weight_dtype!r}")
    g = _Graph(weight_dtype)
    for k, v in (encoder_weights(model) if weights is None else weights).items():
        g.const(k, v)
    g.axes = tuple(g.const(f"axes_{i}", np.array([i], np.int64)) for i in range(3))
    x, h_top = _lstm_layers(g, _embeddings(g), cfg.layers, cfg.hidden)
    g.z_head(x, OUT_Z_SEQ)  # (T, B, D)
    g.z_head(g.node("Squeeze", [h_top, g.axes[0]], "h_top"), OUT_Z_LAST)  # (B, D)
    _surprise(g, cfg.layers)

    io = step_io(cfg.layers, cfg.hidden, cfg.z_dim)
    signature = {name: helper.make_tensor_value_info(name, _ONNX_TYPES[dtype], shape)
                 for name, (dtype, shape) in io.items()}
    graph = helper.make_graph(
        g.nodes, "clickvec_step", [signature[n] for n in STEP_INPUTS], [signature[n] for n in STEP_OUTPUTS],
        initializer=g.inits,
    )
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="clickvec.export",
        ir_version=IR_VERSION,
    )
    onnx.checker.check_model(proto, full_check=True)
    return proto


_ONNX_TYPES = {"float32": TensorProto.FLOAT, "int64": TensorProto.INT64, "int32": TensorProto.INT32}


class _Graph:
    """Nodes and initializers, kept in the order they are added (the order of the proto)."""

    def __init__(self, weight_dtype: str) -> None:
        self.weight_dtype = weight_dtype
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.axes: tuple[str, ...] = ()  # 1-element int64 constants [0], [1], [2]

    def const(self, name: str, value: np.ndarray) -> str:
        value = np.asarray(value)
        if value.dtype == np.float32 and self.weight_dtype == "float16":
            self.inits.append(numpy_helper.from_array(value.astype(np.float16), name + "_f16"))
            self.nodes.append(helper.make_node("Cast", [name + "_f16"], [name], to=TensorProto.FLOAT))
        else:
            self.inits.append(numpy_helper.from_array(value, name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def z_head(self, inp: str, out: str) -> str:
        return self.node("Add", [self.node("MatMul", [inp, "z_head_wT"], out + "_mm"), "z_head_b"], out)


def _embeddings(g: _Graph) -> str:
    """(T, B) indices -> (T, B, E) inputs of the first layer; index 0 rows are zero (padding_idx)."""
    return g.node(
        "Concat",
        [
            g.node("Gather", ["item_emb", IN_ITEM], "x_item"),
            g.node("Gather", ["type_emb", IN_ETYPE], "x_type"),
            g.node("Gather", ["gap_emb", IN_GAP], "x_gap"),
        ],
        "x_0",
        axis=2,
    )


def _lstm_layers(g: _Graph, x: str, layers: int, hidden: int) -> tuple[str, str]:
    """The LSTM stack over `x` and its state outputs; returns (top layer output (T, B, H),
    top layer's final h (1, B, H))."""
    axis0, axis1 = g.axes[0], g.axes[1]
    y_h: list[str] = []
    y_c: list[str] = []
    for layer in range(layers):
        lo = g.const(f"layer{layer}_start", np.array([layer], np.int64))
        hi = g.const(f"layer{layer}_end", np.array([layer + 1], np.int64))
        h0 = g.node("Slice", [IN_H, lo, hi, axis0], f"h0_l{layer}")  # (1, B, H)
        c0 = g.node("Slice", [IN_C, lo, hi, axis0], f"c0_l{layer}")  # (1, B, H)
        outs = [f"Y_l{layer}", f"Yh_l{layer}", f"Yc_l{layer}"]
        # sequence_lens: steps past lengths[b] are not applied; Y_h/Y_c are each user's
        # state after its own last valid step; Y there is zero.
        g.nodes.append(
            helper.make_node(
                "LSTM",
                [x, f"lstm{layer}_W", f"lstm{layer}_R", f"lstm{layer}_B", IN_LENGTHS, h0, c0],
                outs,
                name=f"lstm_l{layer}",
                hidden_size=hidden,
                direction="forward",
            )
        )
        x = g.node("Squeeze", [outs[0], axis1], f"x_{layer + 1}")  # (T, 1, B, H) -> (T, B, H)
        y_h.append(outs[1])
        y_c.append(outs[2])

    if layers == 1:
        g.node("Identity", y_h, OUT_H)
        g.node("Identity", y_c, OUT_C)
    else:
        g.node("Concat", y_h, OUT_H, axis=0)
        g.node("Concat", y_c, OUT_C, axis=0)
    return x, y_h[-1]


def _surprise(g: _Graph, layers: int) -> None:
    """-log p(item_t | z_prev) - log p(event_type_t | z_prev), each with its own log-softmax.

    export/surprise.py (`_EXACT_ITEM_NODES`) replaces the item softmax of this graph by its
    node names (query, item_emb_T, logits_mm, logits, logp, item_idx, logp_item,
    logp_item_sq): renaming one breaks `clickvec export --surprise approx`, loudly."""
    axis0, axis2 = g.axes[0], g.axes[2]
    # Surprise of event t is scored from the vector *before* it: the state handed in
    # for t = 0, this call's z_seq[t - 1] after that.
    top = g.const("top_layer", np.array(layers - 1, np.int64))
    z0 = g.z_head(g.node("Gather", [IN_H, top], "h_in_top", axis=0), "z_in")  # (B, D)
    z0 = g.node("Unsqueeze", [z0, axis0], "z_in_t")  # (1, B, D)
    z_head_prev = g.node(
        "Slice",
        [OUT_Z_SEQ, g.const("zero", np.array([0], np.int64)), g.const("minus_one", np.array([-1], np.int64)), axis0],
        "z_seq_prev",
    )  # (T - 1, B, D)
    z_prev = g.node("Concat", [z0, z_head_prev], "z_prev", axis=0)  # (T, B, D)
    query = g.node("Add", [g.node("MatMul", [z_prev, "item_proj_wT"], "query_mm"), "item_proj_b"], "query")
    emb_t = g.node("Transpose", ["item_emb"], "item_emb_T", perm=[1, 0])  # (Ei, N), folded at load
    logits = g.node("Add", [g.node("MatMul", [query, emb_t], "logits_mm"), "item_bias"], "logits")
    logp = g.node("LogSoftmax", [logits], "logp", axis=-1)  # (T, B, N)
    picked = g.node("GatherElements", [logp, g.node("Unsqueeze", [IN_ITEM, axis2], "item_idx")], "logp_item",
                    axis=2)
    logp_item = g.node("Squeeze", [picked, axis2], "logp_item_sq")  # (T, B)
    # The event type's own log-softmax from the same z_prev (the model's type head).
    type_logits = g.node("Add", [g.node("MatMul", [z_prev, "type_head_wT"], "type_mm"), "type_head_b"],
                         "type_logits")
    logp_t = g.node("LogSoftmax", [type_logits], "logp_type_all", axis=-1)  # (T, B, Ne)
    picked_t = g.node("GatherElements", [logp_t, g.node("Unsqueeze", [IN_ETYPE, axis2], "etype_idx")],
                      "logp_type", axis=2)
    logp_type = g.node("Squeeze", [picked_t, axis2], "logp_type_sq")  # (T, B)
    g.node("Neg", [g.node("Add", [logp_item, logp_type], "logp_event")], OUT_SURPRISE)  # (T, B)
