"""How readable one SAT step is: lines per module, the longest functions and their branch points, and the
satlm functions and files one layer's sparse step visits.

    PYTHONPATH=src python benchmarks/code_shape.py [--top 8]

Branch points are counted from the syntax tree: each if/elif, for, while, try handler, conditional expression,
boolean operator's extra operand and comprehension condition. Hops: the distinct satlm functions (and their
files) entered during one training forward and backward of one wrapped module (attention or MLP) of a tiny Llama,
for each path (paper mode with the dense forward, the thinned forward, history).
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "satlm"


def branch_points(node: ast.AST) -> int:
    n = 0
    for sub in ast.walk(node):
        if isinstance(sub, (ast.If, ast.For, ast.While, ast.IfExp, ast.ExceptHandler, ast.AsyncFor)):
            n += 1
        elif isinstance(sub, ast.BoolOp):
            n += len(sub.values) - 1
        elif isinstance(sub, ast.comprehension):
            n += len(sub.ifs)
    return n


def functions(folder: Path):
    """(file, qualified name, lines, branch points) of every function under folder."""
    out = []
    for path in sorted(folder.rglob("*.py")):
        tree = ast.parse(path.read_text())

        def visit(node, prefix=""):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    name = prefix + child.name
                    inner = [c for c in ast.walk(child) if c is not child
                             and isinstance(c, (ast.FunctionDef, ast.AsyncFunctionDef))]
                    own = branch_points(child) - sum(branch_points(c) for c in inner)
                    out.append((path.relative_to(ROOT.parent), name, child.end_lineno - child.lineno + 1, own))
                    visit(child, name + ".")
                elif isinstance(child, ast.ClassDef):
                    visit(child, prefix + child.name + ".")

        visit(tree)
    return out


def hops(path_name: str, component: str) -> tuple[int, int]:
    """(functions, files) of satlm entered by one forward + backward of layer 0's wrapped `component`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import satlm

    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).train()
    source, forward = {"paper-dense": ("current", "dense"), "paper-thinned": ("current", "sparse"),
                       "history": ("history", "sparse")}[path_name]
    satlm.apply_sat(model, satlm.SATConfig(omission_rate=0.5, attn_omission_rate=0.5, source=source,
                                           forward=forward, schedule="constant"))
    ids = torch.randint(0, 64, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()  # history: the first step seeds the statistics
    layer = model.model.layers[0]
    module = layer.self_attn if component == "attn" else layer.mlp
    x = torch.randn(2, 16, 64, requires_grad=True)
    seen = set()

    def tracer(frame, event, arg):
        if event == "call":
            f = frame.f_code.co_filename
            if "/satlm/" in f and "code_shape" not in f:
                seen.add((f, frame.f_code.co_qualname if hasattr(frame.f_code, "co_qualname") else frame.f_code.co_name))
        return None

    model.sat_runtime.begin_forward(None, x.device)
    if component == "attn":
        cos_sin = model.model.rotary_emb(x, torch.arange(16)[None])
        sys.setprofile(tracer)
        out = module(x, position_embeddings=cos_sin, attention_mask=None)[0]
    else:
        sys.setprofile(tracer)
        out = module(x)
    out.sum().backward()
    sys.setprofile(None)
    return len(seen), len({f for f, _ in seen})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--top", type=int, default=8)
    args = p.parse_args()
    sizes = sorted(((len(f.read_text().splitlines()), f.relative_to(ROOT.parent)) for f in ROOT.rglob("*.py")),
                   reverse=True)
    print("largest modules (lines):", ", ".join(f"{f} {n}" for n, f in sizes[:args.top]))
    modeling = sorted(functions(ROOT / "modeling"), key=lambda r: (-r[2], -r[3]))
    print("modeling/: longest functions (lines, branch points):")
    for f, name, lines, branches in modeling[:args.top]:
        print(f"  {f}:{name} {lines} lines, {branches} branch points")
    worst = max(modeling, key=lambda r: r[3])
    print(f"modeling/: most branch points: {worst[0]}:{worst[1]} {worst[3]} ({worst[2]} lines)")
    for component in ("mlp", "attn"):
        for path_name in ("paper-dense", "paper-thinned", "history"):
            n, files = hops(path_name, component)
            print(f"one {component} step, {path_name}: {n} satlm functions in {files} files")


if __name__ == "__main__":
    main()
