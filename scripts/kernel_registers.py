#!/usr/bin/env python
"""Compile the project's Triton kernels for a GPU offline (no GPU needed) and print, for every
autotune config: registers per thread, spilled bytes, shared memory, how many programs the
registers let one SM hold, instructions per thread (the loops' bodies apart) and, from those, the
instructions of one program and an H200's time to issue a whole step's (65536 rows of attn-only-2l).

    .venv/bin/python scripts/kernel_registers.py [--arch 90] [--json]

Shapes are attn-only-2l's (8 heads of 64, d_model 512, 24 positions, W_U 512 × 48320 in bf16).
Triton's own ptxas assembles each kernel with Triton's options, so the figures are what this Triton
would load on the card; another Triton (a CUDA torch's own) may allocate differently. The issue time
is a floor, not a forecast: it leaves out stalls on memory, barriers and the tensor cores. What to
look for: spills (a kernel that holds a sequence, or a row's slots, in registers is slow once they
overflow to local memory) and instructions far above the arithmetic (docs/PERFORMANCE.md, "Compiled
for sm_90 without a GPU").
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the real configs, not the interpreter's (read at import)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from workers.kernels import attention as attention_kernels
from workers.kernels import unembed_lse  # noqa: E402

REGISTERS_PER_SM, THREADS_PER_SM = 65536, 2048  # every NVIDIA GPU since Volta
# an H200 issues one warp instruction per clock on each of its 132 SMs' 4 schedulers, at up to 1.98 GHz
ISSUE_PER_S = 132 * 4 * 32 * 1.98e9

ROWS, POS, HEADS, D_HEAD, D_MODEL, VOCAB = 65536, 24, 8, 64, 512, 48262  # a bf16 step of attn-only-2l


@dataclass
class Case:
    """One kernel as a step of attn-only-2l runs it: argument types, constants, the integer arguments
    that are multiples of 16 there, and (per config) each loop's trips and the programs a step launches."""
    kernel: object
    types: dict
    consts: dict
    multiples_of_16: set
    trips: Callable[[dict], int] | None  # None: nested loops, no estimate
    programs: Callable[[dict], int]


def _causal(dot: str) -> Case:
    types = dict(qkv_ptr="*fp32", tokens_ptr="*i64", bias_ptr="*fp32", out_ptr="*bf16", P="i32", HD="i32", stride_qkv="i32",
                 stride_out="i32", scale_inv="fp32")
    consts = dict(GATHER=True, BIG_BATCH=True, DOT=dot, N_HEADS=HEADS, D_HEAD=D_HEAD, BLOCK_P=32, BLOCK_E=D_HEAD)
    return Case(attention_kernels._causal_attention_kernel, types, consts, {"HD", "stride_qkv", "stride_out"},
                lambda c: c["GROUP"], lambda c: ROWS * HEADS // c["GROUP"])


def _last() -> Case:
    types = dict(x_ptr="*fp32", tokens_ptr="*i64", added_ptr="*fp32", bias_ptr="*fp32", u_ptr="*fp32", c_ptr="*fp32", mixed_ptr="*bf16",
                 pattern_ptr="*fp32", B="i32", P="i32", D="i32", stride_ub="i32", stride_uh="i32", eps="fp32", scale_inv="fp32")
    # as attn-only-2l runs it: the embedding's rows of the tokens + layer 0's output + b_O, summed as read
    consts = dict(N_HEADS=HEADS, LAYER_NORM=True, BIG_BATCH=True, GATHER=True, ADD=True, BLOCK_P=32, BLOCK_H=HEADS)
    return Case(attention_kernels._last_attention_kernel, types, consts, {"B", "D", "stride_ub", "stride_uh"},
                lambda c: D_MODEL // c.get("CHUNK", D_MODEL),
                lambda c: ROWS)


def _lse() -> Case:
    types = dict(x_ptr="*bf16", top_value_ptr="*fp32", top_ptr="*i32", rest_ptr="*fp32", B="i32", V="i32", stride_x="i32")
    return Case(unembed_lse._lse_kernel, types, dict(BIG_BATCH=True), {"B", "stride_x"}, lambda c: VOCAB // c["BLOCK_V"],
                lambda c: ROWS // c["BLOCK_B"])


# what each kernel runs as in a bf16 step of attn-only-2l (fp32 for the float32 products)
KERNELS = {
    "causal_attention table fp32": _causal("ieee"),
    "causal_attention table bf16/tf32": _causal("tf32"),
    "last_attention": _last(),
    "logits_lse bf16": _lse(),
}


def _is_instruction(line: str) -> bool:
    """An instruction of nvdisasm's listing (``/*0730*/ ... ;``), NOPs (alignment padding) left out."""
    return bool(re.search(r"/\*[0-9a-f]{4,}\*/", line)) and "NOP" not in line


def _instructions(sass: str) -> int:
    """The kernel's instructions per thread, as written (a loop's body counted once)."""
    return sum(map(_is_instruction, sass.splitlines()))


def _loops(sass: str) -> list[int]:
    """Instructions per thread and iteration of each loop: from a label to a branch back to it (an
    outer loop's count holds its inner loops'). A lone BRA to itself ends every kernel: left out."""
    seen, count, loops = {}, 0, []
    for line in sass.splitlines():
        if label := re.match(r"(\.L_x_\d+):", line):
            seen[label.group(1)] = count
        elif _is_instruction(line):
            count += 1
            back = re.search(r"BRA\W+\((\.L_x_\d+)\)", line)  # BRA `(.L_x_1)
            if back and back.group(1) in seen and count - seen[back.group(1)] > 1:
                loops.append(count - seen[back.group(1)])
    return loops


def usage(case: Case, config: triton.Config, arch: int) -> dict:
    """Registers and spills of one config, from ptxas' own report, and its instructions from the
    machine code. Pointers, and the integers named in ``case.multiples_of_16``, are marked divisible
    by 16 as a launch marks them (wide loads depend on it)."""
    consts = {**case.consts, **config.kwargs}
    signature = {**case.types, **{name: "constexpr" for name in consts}}
    names = case.kernel.fn.arg_names
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a, t in case.types.items()
             if t.startswith("*") or a in case.multiples_of_16}
    compiled = triton.compile(ASTSource(fn=case.kernel.fn, signature=signature, constexprs=consts, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages,
                                       **({"maxnreg": config.maxnreg} if config.maxnreg else {})})
    ptxas = Path(get_ptxas(arch).path)  # Triton's own, nvdisasm beside it
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = Path(tmp, "kernel.ptx"), Path(tmp, "kernel.cubin")
        ptx.write_text(compiled.asm["ptx"])
        report = subprocess.run([ptxas, "-v", "--regAllocOptLevel=2", f"--gpu-name=sm_{arch}a", ptx, "-o", cubin],
                                capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([ptxas.with_name("nvdisasm"), "-c", cubin], capture_output=True, text=True, check=True).stdout
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spilled = int(re.search(r"(\d+) bytes spill stores", report).group(1))
    threads, loops = 32 * config.num_warps, _loops(sass)
    result = {"config": {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}, "registers": registers,
              "spill_bytes": spilled, "shared_bytes": compiled.metadata.shared, "instructions": _instructions(sass),
              "loop_instructions": loops, "programs_per_sm_by_registers": min(REGISTERS_PER_SM // (registers * threads),
                                                                              THREADS_PER_SM // threads)}
    if case.trips is not None:  # every loop runs its trips: a program's instructions, all its threads together
        per_thread = result["instructions"] + (case.trips(config.kwargs) - 1) * sum(loops)
        result["instructions_per_program"] = per_thread * threads
        result["issue_ms_per_step"] = 1e3 * result["instructions_per_program"] * case.programs(config.kwargs) / ISSUE_PER_S
    return result


def _usage_of(name: str, config: int, arch: int) -> dict:
    """``usage`` by names a worker process can be sent (a kernel's configs do not pickle)."""
    case = KERNELS[name]
    return usage(case, case.kernel.configs[config], arch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability × 10 (90: H100/H200)")
    parser.add_argument("--json", action="store_true", help="one JSON object: kernel -> configs")
    args = parser.parse_args()
    jobs = [(name, i, args.arch) for name, case in KERNELS.items() for i in range(len(case.kernel.configs))]
    with ProcessPoolExecutor() as pool:  # each config compiles and assembles on its own: one a core
        rows = list(pool.map(_usage_of, *zip(*jobs)))
    results = {name: [row for (of, _, _), row in zip(jobs, rows) if of == name] for name in KERNELS}
    if args.json:
        print(json.dumps(results, indent=1))
        return
    for name, rows in results.items():
        print(name)
        for r in rows:
            print(f"  {r['config']}: {r['registers']} registers, {r['spill_bytes']} bytes spilled, "
                  f"{r['shared_bytes']} bytes shared, registers for {r['programs_per_sm_by_registers']} programs per SM, "
                  f"{r['instructions']} instructions, loops of {r['loop_instructions']}"
                  + (f"; {r['instructions_per_program']:,} a program, {r['issue_ms_per_step']:.2f} ms of issue a step"
                     if "issue_ms_per_step" in r else ""))


if __name__ == "__main__":
    main()
