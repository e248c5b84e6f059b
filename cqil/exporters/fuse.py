"""ONNX Runtime's fused operators in an exported segment: a rewrite of the ONNX graph after export.

    fuse_segment(path, cfg)        # rewrites rank{r}/seg{i}.onnx in place; returns what it fused

What becomes what (only where ONNX Runtime has the op; `cqil-compile --no-fuse` keeps the plain graph):

- **Attention** of every layer whose KV the segment holds (it has a `present.{l}.key` output):
  the scores, mask, softmax, `repeat_kv` expansion and the concatenation of past and new keys
  become one `com.microsoft:GroupQueryAttention` that reads the keys and values of the heads'
  groups without copying them and writes this step's into `present` (into the past's own buffer
  when the runtime binds both to it, see `cqil.runtime.backends.onnxruntime`). GQA's own rotary is
  off (`do_rotary=0`: it would rotate by cache row): the exported rotary and its head views become
  `com.microsoft:RotaryEmbedding` on the projections, indexed into the segment's own cos/sin, so
  positions stay cqil's position ids and a cache whose rows were left-padded, trimmed or merged
  (continuous batching) stays right. The
  padding mask the graph already computes goes in as `attention_bias` ([B, 1, T, total]; GQA adds
  the causal rule itself, which the bias also holds); every row has the same physical length
  (left padding), so `seqlens_k` is total - 1 for every row. Two things differ from the plain
  graph: the op takes several new tokens after a past only at batch 1 (cqil's ONNX Runtime backend
  runs such a step row by row), and a padding position, whose every key is masked, gets other
  logits (meaningless in both).
- **RMSNorm** (Pow, ReduceMean, Add eps, Sqrt, Div, Mul, Mul weight) -> `SimplifiedLayerNormalization`,
  or `com.microsoft:SkipSimplifiedLayerNormalization` when its input is a residual Add (whose sum,
  the op's fourth output, replaces the Add for every other reader).
- **Projections of one activation** (q/k/v, MLP gate and up: MatMuls with weights on the same
  input) -> one MatMul over the concatenated weights and a Split: one pass over the activation, one
  quantized op later.

The rewrite anchors on what cqil controls (the segment's tensor names, its weights, the op pattern
of the traceable model) and fails loudly, naming the layer, on anything else (a rotary of another
pattern is the exception: it stays as exported, in front of the fused attention).
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np

from cqil.errors import CqilError
from cqil.exporters.onnx import rewrite

MS = "com.microsoft"


class OnnxGraph:
    """An ONNX graph with producer / consumer indices and the edits the fusions need."""

    def __init__(self, model):
        self.model, self.g = model, model.graph
        from onnx import TensorProto

        self.inits = {t.name: t for t in self.g.initializer}
        floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16}  # the model's: its float outputs
        self.float_type = next(o.type.tensor_type.elem_type for o in self.g.output
                               if o.type.tensor_type.elem_type in floats)
        self._count = 0
        self.reindex()

    def reindex(self):
        self.prod = {o: n for n in self.g.node for o in n.output if o}
        self.cons = collections.defaultdict(list)
        for n in self.g.node:
            for i in n.input:
                if i:
                    self.cons[i].append(n)

    def name(self, base: str) -> str:
        self._count += 1
        return f"/cqil_fused/{base}_{self._count}"

    def is_noop_cast(self, node) -> bool:
        """Is `node` a Cast to fp32 in an fp32 segment? Asked only of float values (hidden states,
        masks), which the exporter casts with `x.float()` even where x is fp32 already: then its
        output and input are the same tensor. (In fp16/bf16 segments such Casts stay.)"""
        from onnx import TensorProto

        return (node is not None and node.op_type == "Cast" and node.attribute[0].i == TensorProto.FLOAT
                and self.float_type == TensorProto.FLOAT)

    def source(self, tensor: str) -> str:
        """`tensor` before any Identity: the exporter shares equal initializers (norm weights that are
        all ones, say) between layers through Identity nodes."""
        while tensor in self.prod and self.prod[tensor].op_type == "Identity":
            tensor = self.prod[tensor].input[0]
        return tensor

    def const(self, tensor: str):
        """numpy value of an initializer or a Constant node's output, else None."""
        from onnx import numpy_helper

        tensor = self.source(tensor)
        if tensor in self.inits:
            return numpy_helper.to_array(self.inits[tensor])
        n = self.prod.get(tensor)
        if n is not None and n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        return None

    def weight(self, node):
        """The [K, N] weight of a MatMul whose B is an initializer, else None."""
        return self.const(node.input[1]) if node.op_type == "MatMul" and self.source(node.input[1]) in self.inits else None

    def add_init(self, base: str, array) -> str:
        from onnx import numpy_helper

        name = self.name(base)
        t = numpy_helper.from_array(np.array(array, copy=True, order="C"), name)
        self.g.initializer.append(t)
        self.inits[name] = t
        return name

    def add(self, op: str, inputs, outputs=None, domain: str | None = None, **attrs) -> str:
        from onnx import helper

        outputs = outputs or [self.name(op)]
        self.g.node.append(helper.make_node(op, list(inputs), outputs, name=self.name(op + "_node"),
                                            domain=domain, **attrs))
        return outputs[0]

    def walk(self, start: str, forward: bool, match, limit: int = 80):
        """Breadth-first from tensor `start` along consumers (or producers) to the first node `match` accepts."""
        seen, queue = set(), [start]
        while queue and limit > 0:
            limit -= 1
            t = queue.pop(0)
            nodes = self.cons.get(t, ()) if forward else [self.prod[t]] if t in self.prod else []
            for n in nodes:
                if id(n) in seen:
                    continue
                seen.add(id(n))
                if match(n):
                    return n
                queue.extend(o for o in (n.output if forward else n.input) if o and o not in self.inits)
        return None

    def depends_on(self, tensor: str, node, limit: int = 60) -> bool:
        """Whether `tensor` is computed from `node`'s outputs (a short walk up its producers)."""
        return self.walk(tensor, False, lambda n: n is node, limit) is not None

    def finish(self):
        """Topological order, then drop what no output needs (nodes, then initializers)."""
        have = {i.name for i in self.g.input} | set(self.inits) | {""}
        pending, ordered = list(self.g.node), []
        while pending:
            ready = [n for n in pending if all(i in have for i in n.input)]
            if not ready:
                raise CqilError(f"fuse: the rewritten graph has a cycle or a missing input near {pending[0].name}")
            for n in ready:
                have.update(n.output)
            ordered += ready
            pending = [n for n in pending if not any(n is r for r in ready)]
        needed = {o.name for o in self.g.output}
        keep = []
        for n in reversed(ordered):
            if any(o in needed for o in n.output if o):
                keep.append(n)
                needed.update(i for i in n.input if i)
        del self.g.node[:]
        self.g.node.extend(reversed(keep))
        inits = [t for t in self.g.initializer if t.name in needed]
        del self.g.initializer[:]
        self.g.initializer.extend(inits)
        self.inits = {t.name: t for t in inits}
        self.reindex()


def fuse_attention(G: OnnxGraph, cfg) -> int:
    """Attention -> GroupQueryAttention for every layer with a present key output (module docstring)."""
    from onnx import TensorProto

    layers = sorted(int(o.name.split(".")[1]) for o in G.g.output
                    if o.name.startswith("present.") and o.name.endswith(".key"))
    lengths, tables = None, {}
    for l in layers:
        past_k, past_v = f"past_key_values.{l}.key", f"past_key_values.{l}.value"
        cat_k, cat_v = G.prod[f"present.{l}.key"], G.prod[f"present.{l}.value"]
        for cat, past in ((cat_k, past_k), (cat_v, past_v)):
            if cat.op_type != "Concat" or cat.input[0] != past:
                raise CqilError(f"fuse: layer {l}: present is {cat.op_type}{list(cat.input)}, not a Concat of {past}")
        k_rot, v_new = cat_k.input[1], cat_v.input[1]  # [B, kvh, T, hd], k rotated
        scores = G.walk(cat_k.output[0], True, lambda n: n.op_type == "MatMul" and G.weight(n) is None)
        softmax = scores and G.walk(scores.output[0], True, lambda n: n.op_type == "Softmax")
        o_proj = G.walk(cat_v.output[0], True, lambda n: G.weight(n) is not None)
        if scores is None or softmax is None or o_proj is None:
            raise CqilError(f"fuse: layer {l}: the attention does not have the exported pattern")
        q_rot = scores.input[0]  # [B, nh, T, hd], rotated
        bias = _mask_operand(G, softmax, scores, l)
        if lengths is None:  # total and seqlens_k from the mask's shape, once per segment
            shape = G.add("Shape", [bias])
            total64 = G.add("Gather", [shape, G.add_init("idx3", np.array(3, np.int64))], axis=0)
            batch = G.add("Gather", [shape, G.add_init("idx0", np.array([0], np.int64))], axis=0)
            last = G.add("Sub", [total64, G.add_init("one", np.array(1, np.int64))])
            lengths = (G.add("Cast", [G.add("Expand", [last, batch])], to=TensorProto.INT32),
                       G.add("Cast", [total64], to=TensorProto.INT32))
        q = _rotary(G, q_rot, cfg.num_heads, cfg.head_dim, tables) or _flat(G, q_rot)
        k = _rotary(G, k_rot, cfg.num_kv_heads, cfg.head_dim, tables) or _flat(G, k_rot)
        v = _heads_of(G, v_new) or _flat(G, v_new)
        attn = G.name(f"layers.{l}.attention")
        G.add("GroupQueryAttention", [q, k, v, past_k, past_v, *lengths, "", "", "", bias],
              [attn, f"present.{l}.key", f"present.{l}.value"], domain=MS, num_heads=cfg.num_heads,
              kv_num_heads=cfg.num_kv_heads, scale=float(cfg.head_dim ** -0.5), do_rotary=0, local_window_size=-1)
        cat_k.output[0] += "__unfused"
        cat_v.output[0] += "__unfused"
        o_proj.input[0] = attn  # [B, T, nh * hd], what the exported Reshape fed it
        G.reindex()
    return len(layers)


def _flat(G: OnnxGraph, heads: str) -> str:
    """[B, heads, T, hd] -> [B, T, heads * hd], the layout GroupQueryAttention reads."""
    return G.add("Reshape", [G.add("Transpose", [heads], perm=[0, 2, 1, 3]), G.add_init("flat", np.array([0, 0, -1], np.int64))])


def _heads_of(G: OnnxGraph, heads: str) -> str | None:
    """The projection [B, T, heads * hd] that the exported view Transpose(Reshape(x)) made `heads`
    [B, heads, T, hd] from, or None."""
    t = G.prod.get(heads)
    if t is None or t.op_type != "Transpose" or list(t.attribute[0].ints) != [0, 2, 1, 3]:
        return None
    r = G.prod.get(t.input[0])
    return r.input[0] if r is not None and r.op_type == "Reshape" else None


def _rotary(G: OnnxGraph, rotated: str, num_heads: int, head_dim: int, tables: dict) -> str | None:
    """`com.microsoft:RotaryEmbedding` over the projection, for the exported
    `x * cos + cat(-x2, x1) * sin` of a view x, or None (the caller keeps the exported rotary).

    The op indexes a cos/sin table by position ids. The table is the segment's own cos/sin (cqil's
    positions, one row per token: [B * T, hd / 2], the first half of each row, RoPE's halves being
    equal) and the ids count its rows, so a row's rotation is the one the plain graph applies, left
    padding, trimmed or merged caches included. One table per cos/sin pair and segment."""
    add = G.prod.get(rotated)
    if add is None or add.op_type != "Add" or len(add.input) != 2:
        return None
    muls = [G.prod.get(i) for i in add.input]
    if any(m is None or m.op_type != "Mul" for m in muls):
        return None
    for plain, turned in (muls, muls[::-1]):
        x = next((i for i in plain.input if _heads_of(G, i)), None)
        half = next((i for i in turned.input if i in G.prod and G.prod[i].op_type == "Concat"), None)
        if x is None or half is None or not _rotates_half(G, G.prod[half], x):
            continue
        projection = _heads_of(G, x)
        cos, sin = (_shared(G, next(i for i in m.input if i != skip)) for m, skip in ((plain, x), (turned, half)))
        if (cos, sin) not in tables:
            tables[cos, sin] = _rope_tables(G, cos, sin, projection, head_dim)
        return G.add("RotaryEmbedding", [projection, *tables[cos, sin]], domain=MS, interleaved=0, num_heads=num_heads)
    return None


def _shared(G: OnnxGraph, table: str) -> str:
    """The segment's cos (or sin) behind a layer's own view of it: each layer unsqueezes a head axis
    ([B, T, hd] -> [B, 1, T, hd]) and, in fp32, casts it to fp32."""
    while True:
        n = G.prod.get(table)
        if G.is_noop_cast(n) or (n is not None and n.op_type == "Unsqueeze" and G.const(n.input[1]) is not None
                                 and G.const(n.input[1]).tolist() in ([1], 1)):
            table = n.input[0]
        else:
            return table


def _rotates_half(G: OnnxGraph, cat, x: str) -> bool:
    """Is `cat` Concat(Neg(Slice(x)), Slice(x)), rotate_half(x)?"""
    if len(cat.input) != 2:
        return False
    neg, second = G.prod.get(cat.input[0]), G.prod.get(cat.input[1])
    first = G.prod.get(neg.input[0]) if neg is not None and neg.op_type == "Neg" else None
    return all(n is not None and n.op_type == "Slice" and n.input[0] == x for n in (first, second))


def _rope_tables(G: OnnxGraph, cos: str, sin: str, projection: str, head_dim: int) -> tuple[str, str, str]:
    """(position ids [B, T], cos table, sin table [rows, hd / 2]) from the cos/sin the exported
    rotary multiplies by ([B or 1, (1,) T, hd]): row b * T + t of the table is token (b, t)."""
    def ints(name, *values):
        return G.add_init(name, np.array(values, np.int64))

    first_half = [ints("zero", 0), ints("half", head_dim // 2), ints("last", -1)]  # starts, ends, axes
    cos_t, sin_t = (G.add("Reshape", [G.add("Slice", [c, *first_half]), ints("rows", -1, head_dim // 2)])
                    for c in (cos, sin))
    count = G.add("Gather", [G.add("Shape", [cos_t]), G.add_init("idx0", np.array(0, np.int64))], axis=0)
    ids = G.add("Range", [G.add_init("start", np.array(0, np.int64)), count, G.add_init("step", np.array(1, np.int64))])
    bt = G.add("Shape", [projection], start=0, end=2)  # [B, T]
    t = G.add("Shape", [projection], start=1, end=2)
    per_row = G.add("Reshape", [ids, G.add("Concat", [ints("any", -1), t], axis=0)])
    return G.add("Expand", [per_row, bt]), cos_t, sin_t  # a table of T rows (no batch axis) serves every row


def _mask_operand(G: OnnxGraph, softmax, scores, layer: int) -> str:
    """The additive mask that the exported attention adds to the scores before the softmax (in the
    model's dtype: the graph may cast it to fp32 for the softmax)."""
    add = G.prod.get(softmax.input[0])
    if add is None or add.op_type != "Add":
        raise CqilError(f"fuse: layer {layer}: the softmax does not read scores + mask")
    mask = next((i for i in add.input if not G.depends_on(i, scores)), None)
    if mask is None:
        raise CqilError(f"fuse: layer {layer}: no mask operand beside the scores")
    cast = G.prod.get(mask)
    if cast is not None and cast.op_type == "Cast":  # the model's dtype, before the softmax's fp32
        mask = cast.input[0]
    while G.is_noop_cast(G.prod.get(mask)):  # every layer then reads the segment's one mask
        mask = G.prod[mask].input[0]
    return mask


def fuse_rmsnorm(G: OnnxGraph) -> int:
    """RMSNorm chains -> (Skip)SimplifiedLayerNormalization; see the module docstring."""
    count = 0
    for mean in [n for n in G.g.node if n.op_type == "ReduceMean"]:
        chain = _rmsnorm_chain(G, mean)
        if chain is None:
            continue
        x, eps, weight, out, nodes = chain
        nodes[-1].output[0] = out + "__unfused"  # the fused op takes over the chain's output name
        residual = G.prod.get(x)
        outputs = {o.name for o in G.g.output}
        if (residual is not None and residual.op_type == "Add" and x not in outputs
                and all(G.const(i) is None for i in residual.input)):
            total = G.name("residual")
            G.add("SkipSimplifiedLayerNormalization", [residual.input[0], residual.input[1], weight],
                  [out, "", "", total], domain=MS, epsilon=eps)
        else:
            total = x
            G.add("SimplifiedLayerNormalization", [x, weight], [out], axis=-1, epsilon=eps, stash_type=1)
        # every other reader of the norm's input (the next residual Add; in fp32 also through the
        # chain's no-op Cast) reads the residual sum the op hands out
        names = {x, nodes[0].output[0]} if G.is_noop_cast(nodes[0]) else {x}
        for reader in [r for name in names for r in G.cons[name]]:
            if not any(reader is n for n in nodes):
                reader.input[:] = [total if i in names else i for i in reader.input]
        G.reindex()
        count += 1
    return count


def _rmsnorm_chain(G: OnnxGraph, mean):
    """(x, eps, weight initializer, output name, chain nodes) of the traceable model's RMSNorm around
    this ReduceMean, or None when it is not one."""
    def only(tensor, op):
        users = G.cons.get(tensor, [])
        return users[0] if len(users) == 1 and users[0].op_type == op else None

    pow_ = G.prod.get(mean.input[0])
    if pow_ is None or pow_.op_type != "Pow" or G.const(pow_.input[1]) is None or float(G.const(pow_.input[1])) != 2:
        return None
    xf = pow_.input[0]  # x in fp32
    add = only(mean.output[0], "Add")
    sqrt = add and only(add.output[0], "Sqrt")
    div = sqrt and only(sqrt.output[0], "Div")
    if not div or G.const(div.input[0]) is None or float(G.const(div.input[0])) != 1:
        return None
    scale = next((u for u in G.cons[div.output[0]] if u.op_type == "Mul" and xf in u.input), None)
    if scale is None:
        return None
    tail = only(scale.output[0], "Cast") or scale  # back to the model's dtype
    weighted = only(tail.output[0], "Mul")
    if weighted is None:
        return None
    weight = G.source(next(i for i in weighted.input if i != tail.output[0]))
    eps = G.const(next(i for i in add.input if i != mean.output[0]))
    if weight not in G.inits or eps is None:
        return None
    cast_in = G.prod.get(xf)
    x = cast_in.input[0] if cast_in is not None and cast_in.op_type == "Cast" else xf
    nodes = [n for n in (cast_in if x != xf else None, pow_, mean, add, sqrt, div, scale,
                         tail if tail is not scale else None, weighted) if n is not None]
    return x, float(eps), weight, weighted.output[0], nodes


def fuse_gate_up(G: OnnxGraph) -> int:
    """MatMuls with initializer weights of the same K on one activation -> one MatMul + Split."""
    count = 0
    for tensor in list(G.cons):
        mms = [n for n in G.cons[tensor] if n.op_type == "MatMul" and n.input[0] == tensor and G.weight(n) is not None]
        if len(mms) < 2 or len({G.weight(n).shape[0] for n in mms}) != 1:
            continue
        weights = [G.weight(n) for n in mms]
        both = G.add("MatMul", [tensor, G.add_init("gate_up.weight", np.concatenate(weights, axis=1))])
        outs = [n.output[0] for n in mms]
        for n in mms:
            n.output[0] += "__unfused"
        G.add("Split", [both, G.add_init("gate_up.split", np.array([w.shape[1] for w in weights], np.int64))],
              outs, axis=-1)
        G.reindex()
        count += 1
    return count


def fuse_segment(path: Path, cfg) -> dict:
    """Rewrite the segment file at `path` (its weights may sit in `path.data`); returns op counts."""
    import onnx
    from onnx import helper

    path = Path(path)
    model = onnx.load(str(path))  # external data loaded too
    G = OnnxGraph(model)
    done = {"attention": fuse_attention(G, cfg), "rmsnorm": fuse_rmsnorm(G), "gate_up": fuse_gate_up(G)}
    G.finish()
    if not any(o.domain == MS for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS, 1))
    rewrite(model, path)
    return done
