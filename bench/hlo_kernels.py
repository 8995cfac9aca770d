"""The kernels a compiled step launches, read from XLA's optimised HLO text (and, on a GPU, its
thunk sequence): per kernel its bytes read and written, matrix FLOPs, threads, and the line of our
code it comes from. `bench/gpu_aot.py` prints the figures; nothing here needs a device.

Estimates, and their limits:
- bytes = the sizes of a kernel's operands plus its results, as buffers. A kernel that reads only
  part of an operand (a slice fused into it) or updates one in place (dynamic-update-slice) is
  charged the whole buffer; one that reads an operand twice is charged once; caches are ignored.
- FLOPs count matrix products and convolutions only (2 per multiply-add), not elementwise work.
- A kernel inside a loop body counts once per iteration (the loop's known trip count).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

_DTYPE_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
    "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "token": 0,
}  # fmt: skip
_ARRAY = re.compile(r"\b(" + "|".join(sorted(_DTYPE_BYTES, key=len, reverse=True)) + r")\[([0-9,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
# Instructions that launch nothing: views, plumbing and control flow (whose bodies are counted).
NO_KERNEL = frozenset(
    "parameter constant tuple get-tuple-element bitcast after-all while conditional call "
    "partition-id replica-id opt-barrier add-dependency domain".split()
)


def array_shapes(shape_text: str) -> list[tuple[str, tuple[int, ...]]]:
    """`(f32[2,3]{1,0}, s32[])` -> [('f32', (2, 3)), ('s32', ())]."""
    return [
        (dtype, tuple(int(d) for d in dims.split(",") if d)) for dtype, dims in _ARRAY.findall(shape_text)
    ]


def shape_bytes(shape_text: str) -> int:
    return int(sum(_DTYPE_BYTES[dtype] * math.prod(dims) for dtype, dims in array_shapes(shape_text)))


@dataclasses.dataclass
class Instruction:
    name: str
    shape: str  # the result's shape text
    opcode: str
    operands: list[str]
    attributes: str  # everything after the operand list
    is_root: bool = False
    parameter_index: int | None = None  # of a `parameter(i)` instruction

    def attribute(self, key: str) -> str | None:
        found = re.search(rf'\b{key}=("[^"]*"|%?[\w.\-$]+|\{{[^}}]*\}})', self.attributes)
        return found.group(1).lstrip("%").strip('"') if found else None


def _split_instruction(text: str) -> tuple[str, str, list[str], str] | None:
    """`shape opcode(operands), attributes` of one instruction line."""
    depth, start = 0, None
    # The shape may be a tuple in parentheses: the opcode is the first identifier followed by '('
    # at nesting depth 0.
    for index, char in enumerate(text):
        if char in "([{":
            if (
                char == "("
                and depth == 0
                and index > 0
                and (text[index - 1].isalnum() or text[index - 1] in "-_$")
            ):
                start = index
                break
            depth += 1
        elif char in ")]}":
            depth -= 1
    if start is None:
        return None
    head = text[:start]
    opcode_match = re.search(r"([\w\-$]+)$", head)
    if not opcode_match:
        return None
    depth, end = 0, None
    for index in range(start, len(text)):
        if text[index] == "(":
            depth += 1
        elif text[index] == ")":
            depth -= 1
            if depth == 0:
                end = index
                break
    if end is None:
        return None
    operands = re.findall(r"%([\w.\-]+)", text[start + 1 : end])
    return head[: opcode_match.start()].strip(), opcode_match.group(1), operands, text[end + 1 :]


@dataclasses.dataclass
class Module:
    """An optimised HLO module: its computations (name -> instructions) and source locations."""

    computations: dict[str, dict[str, Instruction]]
    entry: str
    frames: dict[int, tuple[str, int, str, int]]  # stack frame -> (file, line, function, parent)

    def instruction(self, name: str) -> Instruction | None:
        for instructions in self.computations.values():
            if name in instructions:
                return instructions[name]
        return None

    def operand_shape(self, computation: dict[str, Instruction], name: str) -> str:
        found = computation.get(name) or self.instruction(name)
        return found.shape if found else ""

    def source(self, instruction: Instruction, package: str = "dino_jax/") -> str:
        """`dino_jax/models/vit.py:247 (Attention.__call__)`: the innermost frame of our package in
        the instruction's stack, else its innermost frame, else its op_name; `grad of ...` when it
        belongs to the backward pass."""
        frame_id = re.search(r"stack_frame_id=(\d+)", instruction.attributes)
        op_name = re.search(r'op_name="([^"]*)"', instruction.attributes)
        backward = "grad of " if op_name and "transpose(" in op_name.group(1) else ""
        seen, innermost = set(), None
        frame = int(frame_id.group(1)) if frame_id else 0
        while frame in self.frames and frame not in seen:
            seen.add(frame)
            path, line, function, parent = self.frames[frame]
            if package in path:
                return f"{backward}{path[path.index(package) :]}:{line} ({function})"
            if innermost is None:
                short = path.split("site-packages/")[-1]
                innermost = f"{short}:{line} ({function})"
            frame = parent
        if innermost:
            return backward + innermost
        return op_name.group(1) if op_name else instruction.opcode


def parse_module(text: str) -> Module:
    computations: dict[str, dict[str, Instruction]] = {}
    entry, current = "", None
    tables: dict[str, dict[int, str]] = collections.defaultdict(dict)
    section = None
    for line in text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = line
            continue
        if section and re.match(r"^\d+ ", line):
            key, value = line.split(" ", 1)
            tables[section][int(key)] = value
            continue
        section = None
        if current is None:
            header = _COMPUTATION.match(line)
            if header and not line.startswith("HloModule"):
                current = header.group(2)
                computations[current] = {}
                if header.group(1):
                    entry = current
            continue
        if line.startswith("}"):
            current = None
            continue
        matched = _INSTRUCTION.match(line)
        if matched:
            parts = _split_instruction(matched.group(3))
            if parts:
                shape, opcode, operands, attributes = parts
                index = None
                if opcode == "parameter":
                    number = re.search(r"parameter\((\d+)\)", matched.group(3))
                    index = int(number.group(1)) if number else None
                computations[current][matched.group(2)] = Instruction(
                    matched.group(2), shape, opcode, operands, attributes, bool(matched.group(1)), index
                )
    return Module(computations, entry, _frames(tables))


def _frames(tables) -> dict[int, tuple[str, int, str, int]]:
    files = {k: v.strip('"') for k, v in tables["FileNames"].items()}
    functions = {k: v.strip('"') for k, v in tables["FunctionNames"].items()}
    locations = {}
    for key, value in tables["FileLocations"].items():
        fields = dict(re.findall(r"(\w+)=(\d+)", value))
        locations[key] = (
            files.get(int(fields.get("file_name_id", 0)), "?"),
            int(fields.get("line", 0)),
            functions.get(int(fields.get("function_name_id", 0)), "?"),
        )
    frames = {}
    for key, value in tables["StackFrames"].items():
        fields = dict(re.findall(r"(\w+)=(\d+)", value))
        path, line, function = locations.get(int(fields.get("file_location_id", 0)), ("?", 0, "?"))
        frames[key] = (path, line, function, int(fields.get("parent_frame_id", 0)))
    return frames


@dataclasses.dataclass
class Kernel:
    name: str  # the HLO instruction
    kind: str  # e.g. loop_add_fusion, input_reduce_fusion, gemm_fusion_dot, cudnn_conv, copy
    launches: int  # per step (loop trip counts)
    bytes: int  # per launch: operands + results
    flops: float  # per launch: matrix products and convolutions
    matrix_dtype: str  # operand type of its products ("" when none)
    threads: int | None  # grid x block, where the thunk sequence says
    source: str


def _kind(instruction: Instruction) -> str:
    if instruction.opcode == "custom-call":
        target = instruction.attribute("custom_call_target") or ""
        target = target.strip('"')
        if "cudnn" in target:
            return "cudnn_conv" if "conv" in target.lower() else "cudnn"
        if "cublas" in target:
            return "cublas_gemm"
        return target or "custom-call"
    if instruction.opcode == "fusion":
        return re.sub(r"(\.\d+)+$", "", instruction.name)
    return instruction.opcode


def _called(instruction: Instruction) -> list[str]:
    names = []
    for key in ("calls", "to_apply", "body", "condition"):
        value = instruction.attribute(key)
        if value:
            names.extend(n.strip("%{} ") for n in value.split(","))
    return names


def _matrix_flops(module: Module, instruction: Instruction, depth: int = 0) -> tuple[float, str]:
    """2 x multiply-adds of the dots and convolutions in `instruction` (recursing into what it
    calls), and the element type of their first operand."""
    if depth > 4:
        return 0.0, ""
    flops, dtype = 0.0, ""
    is_conv = instruction.opcode == "convolution" or (
        instruction.opcode == "custom-call" and "conv" in (instruction.attribute("custom_call_target") or "")
    )
    if instruction.opcode == "dot" or is_conv:
        return _product_flops(module, instruction, is_conv)
    if instruction.opcode == "custom-call" and "triton" in (
        instruction.attribute("custom_call_target") or ""
    ):
        return _pallas_flops(module, instruction)
    for called in _called(instruction):
        for inner in module.computations.get(called, {}).values():
            inner_flops, inner_dtype = _matrix_flops(module, inner, depth + 1)
            flops += inner_flops
            dtype = dtype or inner_dtype
    return flops, dtype


# A Pallas kernel's products are inside its Triton IR (bytecode in the HLO): counted here from its
# name (the pallas_call's op_name) and operands: the rows (R, D) first, a weight (D, W) among them.
# The MLP branch's forward is two products of R x D x H, its backward three (fc1 recomputed, fc2's
# and fc1's input gradients); the qkv and output projections one each way. Counted at the true D,
# not the tile's padded width.
PALLAS_PRODUCTS = {  # name: (products of R x D x W's columns, W's place among the operands)
    "mlp_branch_forward_kernel": (2, 3),
    "mlp_branch_backward_kernel": (3, 4),
    "norm_qkv_forward_kernel": (1, 3),
    "norm_qkv_backward_kernel": (1, 4),
    "proj_forward_kernel": (1, 1),
    "proj_backward_kernel": (1, 1),
}


def _pallas_flops(module: Module, instruction: Instruction) -> tuple[float, str]:
    op_name = re.search(r'op_name="([^"]*)"', instruction.attributes)
    names = op_name.group(1).split("/") if op_name else []
    known = [name for name in names if name in PALLAS_PRODUCTS]
    if not known:
        return 0.0, ""
    products, weight_operand = PALLAS_PRODUCTS[known[-1]]
    computation = next((c for c in module.computations.values() if instruction.name in c), {})
    shapes = [array_shapes(module.operand_shape(computation, name)) for name in instruction.operands]
    (dtype, (rows, dim)), (_, (_, hidden)) = shapes[0][0], shapes[weight_operand][0]
    return 2.0 * products * rows * dim * hidden, dtype


def _product_flops(module: Module, instruction: Instruction, is_conv: bool) -> tuple[float, str]:
    computation = next((c for c in module.computations.values() if instruction.name in c), {})
    operand_shapes = [
        array_shapes(module.operand_shape(computation, name)) for name in instruction.operands[:2]
    ]
    if len(operand_shapes) < 2 or not operand_shapes[0] or not operand_shapes[1]:
        return 0.0, ""
    (lhs_dtype, lhs_dims), (_, rhs_dims) = operand_shapes[0][0], operand_shapes[1][0]
    results = array_shapes(instruction.shape)
    # A library call's result is (output, workspace): the output is the first array.
    out_dims = results[0][1] if results else ()
    if is_conv:
        labels = re.search(r"dim_labels=\w+_(\w+)->", instruction.attributes)
        rhs_labels = labels.group(1) if labels else ""
        out_features = rhs_dims[rhs_labels.index("o")] if "o" in rhs_labels else 1
        groups = int(instruction.attribute("feature_group_count") or 1)
        return 2.0 * math.prod(out_dims) * math.prod(rhs_dims) / max(out_features, 1) / groups, lhs_dtype
    contracting = instruction.attribute("lhs_contracting_dims")
    dims = [int(d) for d in re.findall(r"\d+", contracting or "")]
    return 2.0 * math.prod(out_dims) * math.prod(lhs_dims[d] for d in dims), lhs_dtype


_SLICES = ("slice", "dynamic-slice")


def _users(computation: dict[str, Instruction]) -> dict[str, list[Instruction]]:
    users: dict[str, list[Instruction]] = collections.defaultdict(list)
    for instruction in computation.values():
        for operand in instruction.operands:
            users[operand].append(instruction)
    return users


def _read_through_views(name: str, users, depth: int = 0) -> list[Instruction] | None:
    """The slices that read parameter `name` (through bitcasts), or None if anything else reads
    it whole."""
    found = []
    for user in users.get(name, []):
        if user.opcode in _SLICES and user.operands[0] == name:
            found.append(user)
        elif user.opcode == "bitcast" and depth < 3:
            inner = _read_through_views(user.name, users, depth + 1)
            if inner is None:
                return None
            found.extend(inner)
        else:
            return None
    return found or None


def _io_bytes(module: Module, computation: dict[str, Instruction], instruction: Instruction) -> int:
    """Bytes a kernel reads and writes. A fusion that reads a buffer only through slices is charged
    the slices; one that updates a buffer in place (dynamic-update-slice, e.g. a loop writing its
    iteration's rows) is charged the update, not the buffer."""
    result = instruction.shape
    if instruction.opcode == "custom-call":
        # Library calls return (output, scratch workspace): the workspace is not traffic.
        arrays = array_shapes(result)
        result_bytes = sum(_DTYPE_BYTES[t] * math.prod(d) for t, d in arrays if t != "s8" or len(arrays) == 1)
    else:
        result_bytes = shape_bytes(result)
    operands = list(dict.fromkeys(instruction.operands))
    operand_bytes = {name: shape_bytes(module.operand_shape(computation, name)) for name in operands}
    if instruction.opcode == "dynamic-update-slice":
        update = shape_bytes(module.operand_shape(computation, instruction.operands[1]))
        return int(2 * update)
    if instruction.opcode in _SLICES:
        return int(2 * result_bytes)
    fused = (
        module.computations.get(instruction.attribute("calls") or "", {})
        if instruction.opcode == "fusion"
        else {}
    )
    if fused:
        users = _users(fused)
        root = next((i for i in fused.values() if i.is_root), None)
        roots = (
            [fused[n] for n in root.operands if n in fused]
            if root is not None and root.opcode == "tuple"
            else [root]
        )
        for position, operand in enumerate(instruction.operands):
            parameter = next(
                (p for p in fused.values() if p.opcode == "parameter" and p.parameter_index == position), None
            )
            if parameter is None or operand not in operand_bytes:
                continue
            updated = [
                r
                for r in roots
                if r is not None and r.opcode == "dynamic-update-slice" and r.operands[0] == parameter.name
            ]
            if updated:  # in place: the output aliases it; the update is charged on the output side
                operand_bytes[operand] = 0
                result_bytes -= shape_bytes(updated[0].shape) - shape_bytes(
                    module.operand_shape(fused, updated[0].operands[1])
                )
                continue
            slices = _read_through_views(parameter.name, users)
            if slices is not None:
                operand_bytes[operand] = min(
                    operand_bytes[operand], sum(shape_bytes(s.shape) for s in slices)
                )
    return int(result_bytes + sum(operand_bytes.values()))


def _trip_count(instruction: Instruction) -> int:
    found = re.search(r'"known_trip_count":\{"n":"(\d+)"', instruction.attributes)
    return int(found.group(1)) if found else 1


def kernels_from_hlo(module: Module) -> list[Kernel]:
    """Every instruction that launches work, walking the entry computation and the bodies of its
    loops and conditionals (a TPU program, or a GPU one without its thunk sequence)."""
    found: list[Kernel] = []

    def walk(computation_name: str, launches: int, depth: int) -> None:
        computation = module.computations.get(computation_name, {})
        for instruction in computation.values():
            if instruction.opcode == "while":
                trips = _trip_count(instruction)
                walk(instruction.attribute("body") or "", launches * trips, depth + 1)
                walk(instruction.attribute("condition") or "", launches * (trips + 1), depth + 1)
            elif instruction.opcode in ("conditional", "call") and depth < 8:
                for called in re.findall(r"%([\w.\-]+)", instruction.attributes):
                    if called in module.computations and called != computation_name:
                        walk(called, launches, depth + 1)
            elif instruction.opcode not in NO_KERNEL:
                found.append(_kernel(module, computation, instruction, launches, None))

    walk(module.entry, 1, 0)
    return found


def _kernel(module, computation, instruction, launches, threads) -> Kernel:
    flops, dtype = _matrix_flops(module, instruction)
    return Kernel(
        name=instruction.name,
        kind=_kind(instruction),
        launches=launches,
        bytes=_io_bytes(module, computation, instruction),
        flops=flops,
        matrix_dtype=dtype,
        threads=threads,
        source=module.source(instruction),
    )


_THUNK_LINE = re.compile(r"^(\s*)(\d+): (k\w+)\s*\[[^\]]*\]\s*(.*)$")
LAUNCHING_THUNKS = frozenset(
    "kKernel kCustomKernel kGemm kCublasLtMatmul kConvolution kCuDnn kCustomCall kFft "
    "kTriangularSolve kCopy kMemset32BitValue kMemzero kNorm".split()
)


def thunk_annotations(metadata_text: str) -> dict[int, str]:
    """thunk id -> the HLO instruction it runs (`*.thunk_metadata.txt` of an XLA dump)."""
    annotations = {}
    for block in metadata_text.split("thunk_metadata {")[1:]:
        thunk_id = re.search(r"thunk_id: (\d+)", block)
        annotation = re.search(r'profile_annotation: "([^"]*)"', block)
        if thunk_id and annotation:
            annotations[int(thunk_id.group(1))] = annotation.group(1)
    return annotations


def kernels_from_thunks(module: Module, sequence_text: str, annotations: dict[int, str]) -> list[Kernel]:
    """The kernels a GPU executable launches, in order (`*.thunk_sequence_after_thunk_passes.txt`):
    each thunk that launches work, matched to its HLO instruction for bytes, FLOPs and source.
    Thunks nested under a while loop count once per iteration."""
    by_name = {
        name: (computation, instruction)
        for computation in module.computations.values()
        for name, instruction in computation.items()
    }
    sanitized = {name.replace(".", "_"): name for name in by_name}
    found: list[Kernel] = []
    loops: list[tuple[int, int]] = []  # (indent of the loop line, launches per step inside it)
    for line in sequence_text.splitlines():
        matched = _THUNK_LINE.match(line)
        if not matched:
            continue
        indent, thunk_id, kind, rest = (
            len(matched.group(1)),
            int(matched.group(2)),
            matched.group(3),
            matched.group(4),
        )
        while loops and indent <= loops[-1][0]:
            loops.pop()
        launches = loops[-1][1] if loops else 1
        annotation = annotations.get(thunk_id, "")
        named = rest.split(" ")[0] if rest else ""
        name = annotation if annotation in by_name else sanitized.get(named, annotation)
        if kind == "kWhile":
            _, instruction = by_name.get(name, ({}, None))
            loops.append((indent, launches * (_trip_count(instruction) if instruction else 1)))
            continue
        if kind not in LAUNCHING_THUNKS:
            continue
        threads = None
        grid = re.search(r"grid: \[(\d+), (\d+), (\d+)\] threads: \[(\d+), (\d+), (\d+)\]", rest)
        if grid:
            threads = math.prod(int(g) for g in grid.groups())
        if name in by_name:
            computation, instruction = by_name[name]
            kernel = _kernel(module, computation, instruction, launches, threads)
        else:
            kernel = Kernel(name or kind, kind, launches, 0, 0.0, "", threads, "?")
        if kind == "kCopy":
            kernel.kind = "copy"
        found.append(kernel)
    return found


@dataclasses.dataclass(frozen=True)
class Chip:
    memory_bandwidth: float  # bytes/s
    peak_bf16_flops: float
    peak_fp32_flops: float
    launch_floor_s: float  # the least time any kernel takes on the device


def kernel_time_bound(kernel: Kernel, chip: Chip) -> float:
    """Roofline lower bound of one launch: its bytes at full bandwidth, its products at peak, or
    the launch floor, whichever is longest."""
    peak = chip.peak_fp32_flops if kernel.matrix_dtype in ("f32", "f64") else chip.peak_bf16_flops
    return max(kernel.bytes / chip.memory_bandwidth, kernel.flops / peak, chip.launch_floor_s)


TINY_THREADS = 1024


def summarise(kernels: list[Kernel], chip: Chip, top: int = 12) -> dict:
    launches = sum(k.launches for k in kernels)
    total_bytes = sum(k.bytes * k.launches for k in kernels)
    total_flops = sum(k.flops * k.launches for k in kernels)
    by_kind = collections.Counter()
    for k in kernels:
        by_kind[k.kind] += k.launches
    by_source: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for k in kernels:
        by_source[k.source][0] += k.bytes * k.launches
        by_source[k.source][1] += k.launches
    largest = sorted(kernels, key=lambda k: k.bytes * k.launches, reverse=True)[:top]
    tiny_by_source = collections.Counter()
    for k in kernels:
        if k.threads is not None and k.threads <= TINY_THREADS:
            tiny_by_source[k.source] += k.launches
    return {
        "kernels": launches,
        "copies": sum(k.launches for k in kernels if k.kind == "copy"),
        "tiny_kernels": sum(
            k.launches for k in kernels if k.threads is not None and k.threads <= TINY_THREADS
        ),
        "library_calls": sum(k.launches for k in kernels if k.kind.startswith(("cudnn", "cublas"))),
        "bytes": total_bytes,
        "matrix_flops": total_flops,
        "bound_s": sum(kernel_time_bound(k, chip) * k.launches for k in kernels),
        "bytes_bound_s": total_bytes / chip.memory_bandwidth,
        "launch_floor_s": launches * chip.launch_floor_s,
        "by_kind": dict(by_kind.most_common()),
        "largest": [
            {
                "name": k.name,
                "kind": k.kind,
                "bytes": k.bytes * k.launches,
                "launches": k.launches,
                "source": k.source,
            }
            for k in largest
        ],
        "tiny_by_source": dict(tiny_by_source.most_common(top)),
        "by_source": sorted(
            ({"source": s, "bytes": b, "kernels": n} for s, (b, n) in by_source.items()),
            key=lambda row: row["bytes"],
            reverse=True,
        )[:top],
    }


def from_dump(dump: str, module: str = "jit_train_step") -> tuple[Module, list[Kernel]]:
    """The module and kernels of an XLA GPU dump folder (`--xla_dump_to`), for a second look
    without compiling again (`bench/gpu_aot.py --keep-dump`)."""
    import glob
    import os

    (metadata,) = glob.glob(os.path.join(dump, f"*{module}*.thunk_metadata.txt"))
    prefix = metadata[: -len(".thunk_metadata.txt")]
    (optimised,) = glob.glob(prefix + "*gpu_after_optimizations.txt")
    sequence = prefix + ".thunk_sequence_after_thunk_passes.txt"
    if not os.path.exists(sequence):
        sequence = prefix + ".thunk_sequence.txt"
    with open(optimised) as f, open(sequence) as g, open(metadata) as h:
        parsed = parse_module(f.read())
        return parsed, kernels_from_thunks(parsed, g.read(), thunk_annotations(h.read()))


if __name__ == "__main__":
    import json
    import sys

    _, found = from_dump(sys.argv[1])
    print(json.dumps(summarise(found, Chip(3.35e12, 989e12, 494.7e12, 2e-6), top=40), indent=1))
