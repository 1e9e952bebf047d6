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
from clickvec.training.model import Encoder
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
)

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
    w = encoder_weights(model) if weights is None else weights
    L, H = cfg.layers, cfg.hidden
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def const(name: str, value: np.ndarray) -> str:
        value = np.asarray(value)
        if value.dtype == np.float32 and weight_dtype == "float16":
            inits.append(numpy_helper.from_array(value.astype(np.float16), name + "_f16"))
            nodes.append(helper.make_node("Cast", [name + "_f16"], [name], to=TensorProto.FLOAT))
        else:
            inits.append(numpy_helper.from_array(value, name))
        return name

    def node(op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    for k, v in w.items():
        const(k, v)
    axis0 = const("axes_0", np.array([0], np.int64))
    axis1 = const("axes_1", np.array([1], np.int64))
    axis2 = const("axes_2", np.array([2], np.int64))

    # Embeddings (T, B) -> (T, B, E); index 0 rows are zero (padding_idx).
    x = node(
        "Concat",
        [
            node("Gather", ["item_emb", IN_ITEM], "x_item"),
            node("Gather", ["type_emb", IN_ETYPE], "x_type"),
            node("Gather", ["gap_emb", IN_GAP], "x_gap"),
        ],
        "x_0",
        axis=2,
    )

    y_h: list[str] = []
    y_c: list[str] = []
    for layer in range(L):
        lo = const(f"layer{layer}_start", np.array([layer], np.int64))
        hi = const(f"layer{layer}_end", np.array([layer + 1], np.int64))
        h0 = node("Slice", [IN_H, lo, hi, axis0], f"h0_l{layer}")  # (1, B, H)
        c0 = node("Slice", [IN_C, lo, hi, axis0], f"c0_l{layer}")  # (1, B, H)
        outs = [f"Y_l{layer}", f"Yh_l{layer}", f"Yc_l{layer}"]
        # sequence_lens: steps past lengths[b] are not applied; Y_h/Y_c are each user's
        # state after its own last valid step; Y there is zero.
        nodes.append(
            helper.make_node(
                "LSTM",
                [x, f"lstm{layer}_W", f"lstm{layer}_R", f"lstm{layer}_B", IN_LENGTHS, h0, c0],
                outs,
                name=f"lstm_l{layer}",
                hidden_size=H,
                direction="forward",
            )
        )
        x = node("Squeeze", [outs[0], axis1], f"x_{layer + 1}")  # (T, 1, B, H) -> (T, B, H)
        y_h.append(outs[1])
        y_c.append(outs[2])

    if L == 1:
        node("Identity", y_h, OUT_H)
        node("Identity", y_c, OUT_C)
    else:
        node("Concat", y_h, OUT_H, axis=0)
        node("Concat", y_c, OUT_C, axis=0)

    def z_head(inp: str, out: str) -> str:
        return node("Add", [node("MatMul", [inp, "z_head_wT"], out + "_mm"), "z_head_b"], out)

    z_head(x, OUT_Z_SEQ)  # (T, B, D)
    z_head(node("Squeeze", [y_h[-1], axis0], "h_top"), OUT_Z_LAST)  # (B, D)

    # Surprise of event t is scored from the vector *before* it: the state handed in
    # for t = 0, this call's z_seq[t - 1] after that.
    top = const("top_layer", np.array(L - 1, np.int64))
    z0 = z_head(node("Gather", [IN_H, top], "h_in_top", axis=0), "z_in")  # (B, D)
    z0 = node("Unsqueeze", [z0, axis0], "z_in_t")  # (1, B, D)
    z_head_prev = node(
        "Slice",
        [OUT_Z_SEQ, const("zero", np.array([0], np.int64)), const("minus_one", np.array([-1], np.int64)), axis0],
        "z_seq_prev",
    )  # (T - 1, B, D)
    z_prev = node("Concat", [z0, z_head_prev], "z_prev", axis=0)  # (T, B, D)
    query = node("Add", [node("MatMul", [z_prev, "item_proj_wT"], "query_mm"), "item_proj_b"], "query")
    emb_t = node("Transpose", ["item_emb"], "item_emb_T", perm=[1, 0])  # (Ei, N), folded at load
    logits = node("Add", [node("MatMul", [query, emb_t], "logits_mm"), "item_bias"], "logits")
    logp = node("LogSoftmax", [logits], "logp", axis=-1)  # (T, B, N)
    picked = node("GatherElements", [logp, node("Unsqueeze", [IN_ITEM, axis2], "item_idx")], "logp_item", axis=2)
    logp_item = node("Squeeze", [picked, axis2], "logp_item_sq")  # (T, B)
    # The event type's own log-softmax from the same z_prev (the model's type head).
    type_logits = node("Add", [node("MatMul", [z_prev, "type_head_wT"], "type_mm"), "type_head_b"], "type_logits")
    logp_t = node("LogSoftmax", [type_logits], "logp_type_all", axis=-1)  # (T, B, Ne)
    picked_t = node("GatherElements", [logp_t, node("Unsqueeze", [IN_ETYPE, axis2], "etype_idx")], "logp_type",
                    axis=2)
    logp_type = node("Squeeze", [picked_t, axis2], "logp_type_sq")  # (T, B)
    node("Neg", [node("Add", [logp_item, logp_type], "logp_event")], OUT_SURPRISE)  # (T, B)

    D = cfg.z_dim
    f32, i64, i32 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32
    inputs = [
        helper.make_tensor_value_info(IN_ITEM, i64, ["T", "B"]),
        helper.make_tensor_value_info(IN_ETYPE, i64, ["T", "B"]),
        helper.make_tensor_value_info(IN_GAP, i64, ["T", "B"]),
        helper.make_tensor_value_info(IN_LENGTHS, i32, ["B"]),
        helper.make_tensor_value_info(IN_H, f32, [L, "B", H]),
        helper.make_tensor_value_info(IN_C, f32, [L, "B", H]),
    ]
    outputs = [
        helper.make_tensor_value_info(OUT_H, f32, [L, "B", H]),
        helper.make_tensor_value_info(OUT_C, f32, [L, "B", H]),
        helper.make_tensor_value_info(OUT_Z_SEQ, f32, ["T", "B", D]),
        helper.make_tensor_value_info(OUT_Z_LAST, f32, ["B", D]),
        helper.make_tensor_value_info(OUT_SURPRISE, f32, ["T", "B"]),
    ]
    graph = helper.make_graph(nodes, "clickvec_step", inputs, outputs, initializer=inits)
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="clickvec.export",
        ir_version=IR_VERSION,
    )
    onnx.checker.check_model(proto, full_check=True)
    return proto
