"""A small mutation run: does the test suite notice one-line bugs in minisv's modules?

    nice -n 10 python tests/bench/mutate.py --out runs/mutants.jsonl          # the default sample
    python tests/bench/mutate.py --list                                                      # the mutants only
    python tests/bench/mutate.py --rerun runs/mutants.jsonl --out after.jsonl  # its survivors again

For each module it samples one-line mutants (fixed seed, a few per operator class so the sample mixes them):

    arith   + <-> -  (also += / -=, and a unary minus)       compare  < <-> <=, > <-> >=
    equal   == <-> !=                                         index    an integer literal 0 <-> 1
    trans   .t() / .T / .transpose(a, b) removed              dim      keepdim flipped, dim=... changed
    minmax  min <-> max (argmin/argmax, amin/amax too)        delete   a one-line statement deleted (still parses)
    not     a boolean `not` dropped (also `not in`, `is not`)

Operators are found with `tokenize`, so nothing inside strings, f-strings or comments is touched. Every mutant
must still parse. Each one is applied to a private copy of the repository at `--rev` (`git archive`, so the run
sees committed files only), that module's test files run there (`MODULE_TESTS`, plus every guard test file named
after the module, test_guards_MODULE*.py, the copy holds) with `-x` and a timeout of `--timeout-factor` times the
unmutated run, and the file is restored. A mutant is killed (a test failed), survived (every test passed) or timeout.
Results are appended to --out as JSON lines as they come (a run can be watched, and stopped), then summarized
per module.
"""
import argparse
import ast
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tokenize
import zlib
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# module -> the test files that exercise it, fastest-failing first (-x stops at the first failure)
MODULE_TESTS = {
    "transcoder": ["test_transcoder.py", "test_losses.py", "test_export.py"],
    "clt": ["test_clt.py"],
    "training": ["test_losses.py", "test_training.py", "test_training_streams.py", "test_clt.py"],
    "evals": ["test_evals.py", "test_losses.py", "test_clt.py"],
    "pullbacks": ["test_circuits.py", "test_obprop.py", "test_clt.py", "test_graph.py"],
    "circuits": ["test_circuits.py", "test_graph.py"],
    "graph": ["test_graph.py", "test_circuit_tracer.py", "test_browser_graph.py"],
    "obprop": ["test_obprop.py"],
    "steering": ["test_steering.py", "test_control_vector.py"],
    "model": ["test_model.py", "test_families.py", "test_guards_generation.py", "test_guards_config.py"],
    "formats": ["test_export.py", "test_transcoder.py", "test_adversarial.py"],
    "circuit_tracer": ["test_circuit_tracer.py", "test_browser_graph.py"],
    "dashboards": ["test_report.py", "test_browser_graph.py"],
    "activations": ["test_training_streams.py", "test_training.py"],
}
SWAPS = {"+": "-", "-": "+", "+=": "-=", "-=": "+=", "<": "<=", "<=": "<", ">": ">=", ">=": ">", "==": "!=",
         "!=": "=="}
CLASS_OF = {"+": "arith", "-": "arith", "+=": "arith", "-=": "arith", "<": "compare", "<=": "compare",
            ">": "compare", ">=": "compare", "==": "equal", "!=": "equal"}
MINMAX = {"min": "max", "max": "min", "argmin": "argmax", "argmax": "argmin", "amin": "amax", "amax": "amin"}


def candidates(source):
    """Every one-line mutant of `source` that still parses: dicts {line (1-based), kind, original, mutated}."""
    lines = source.splitlines(keepends=True)
    toks = list(tokenize.generate_tokens(io.StringIO(source).readline))
    found = []

    def replace(tok_start, tok_end, new, kind):     # a change inside one physical line
        (r, c0), (r1, c1) = tok_start, tok_end
        if r == r1:
            line = lines[r - 1]
            found.append((r, line, line[:c0] + new + line[c1:], kind))

    for i, t in enumerate(toks):
        prev = toks[i - 1] if i else None
        nxt = toks[i + 1] if i + 1 < len(toks) else None
        if t.type == tokenize.OP and t.string in SWAPS:
            replace(t.start, t.end, SWAPS[t.string], CLASS_OF[t.string])
        elif t.type == tokenize.NUMBER and t.string in ("0", "1"):
            replace(t.start, t.end, "1" if t.string == "0" else "0", "index")
        elif t.type == tokenize.NAME and t.string in MINMAX:
            replace(t.start, t.end, MINMAX[t.string], "minmax")
        elif t.type == tokenize.NAME and t.string == "not":
            end = nxt.start if nxt is not None and nxt.start[0] == t.start[0] else t.end
            replace(t.start, end, "", "not")
        elif t.type == tokenize.NAME and t.string in ("t", "T", "transpose") and prev is not None \
                and prev.string == ".":
            if t.string == "T":                     # x.T as a transpose (not run.T, a length)
                before = toks[i - 2].string if i >= 2 else ""
                if (nxt is not None and nxt.string == "@") or before in (")", "]"):
                    replace(prev.start, t.end, "", "trans")
            else:                                   # .t() / .transpose(...): up to the matching parenthesis
                depth, j = 0, i + 1
                while j < len(toks):
                    depth += toks[j].string == "("
                    depth -= toks[j].string == ")"
                    if depth == 0:
                        break
                    j += 1
                if j < len(toks) and toks[i + 1].string == "(":
                    replace(prev.start, toks[j].end, "", "trans")
        elif t.type == tokenize.NAME and t.string in ("keepdim", "dim") and nxt is not None and nxt.string == "=":
            value = toks[i + 2]
            if t.string == "keepdim" and value.string in ("True", "False"):
                replace(value.start, value.end, "False" if value.string == "True" else "True", "dim")
            elif t.string == "dim":
                if value.string == "-" and toks[i + 3].type == tokenize.NUMBER:
                    replace(value.start, toks[i + 3].end, "0", "dim")
                elif value.type == tokenize.NUMBER:
                    replace(value.start, value.end, "-1" if value.string == "0" else "0", "dim")
    # deletions: a simple statement that starts and ends on one physical line
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.stmt) and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef,
                                                                ast.If, ast.For, ast.While, ast.With, ast.Try,
                                                                ast.Import, ast.ImportFrom)) \
                and node.lineno == node.end_lineno and not (isinstance(node, ast.Expr)
                                                            and isinstance(node.value, ast.Constant)):
            line = lines[node.lineno - 1]
            if line.strip() and line.lstrip().startswith(ast.get_source_segment(source, node)[:1]):
                found.append((node.lineno, line, "", "delete"))
    out, seen = [], set()
    for r, old, new, kind in found:
        if new == old or (r, new) in seen:
            continue
        mutated = "".join(lines[:r - 1]) + new + "".join(lines[r:])
        try:
            compile(mutated, "<mutant>", "exec")      # also refuses a repeated keyword (min=, min=)
        except SyntaxError:
            continue
        seen.add((r, new))
        out.append({"line": r, "kind": kind, "original": old, "mutated": new})
    return out


def sample(module, source, n, seed):
    """n mutants of one module: operator classes in a seeded order, one random mutant of each class in turn."""
    rng = random.Random(seed * 1_000_003 + zlib.crc32(module.encode()))
    by_kind = defaultdict(list)
    for m in candidates(source):
        by_kind[m["kind"]].append(m)
    kinds = sorted(by_kind)
    rng.shuffle(kinds)
    chosen = []
    while len(chosen) < n and any(by_kind.values()):
        for kind in kinds:
            if by_kind[kind] and len(chosen) < n:
                chosen.append(by_kind[kind].pop(rng.randrange(len(by_kind[kind]))))
    for m in chosen:
        m["module"] = module
        m["id"] = f"{module}:{m['line']}:{m['kind']}:{zlib.crc32(m['mutated'].encode()):08x}"
    return sorted(chosen, key=lambda m: m["line"])


def test_files(root, module):
    files = list(MODULE_TESTS[module])
    files += sorted(p.name for p in (root / "tests").glob(f"test_guards_{module}*.py") if p.name not in files)
    return [f"tests/{f}" for f in files]


def run_tests(root, files, timeout, deselect=(), stop=True):
    """(status, seconds, failing tests) of `pytest -x` on files in the copy at root."""
    env = dict(os.environ, PYTHONPATH=str(root), PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider", f"--basetemp={root}/.pytest_tmp",
           "-W", "ignore", *(["-x"] if stop else []), *(f"--deselect={t}" for t in deselect)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)      # the pytest we started, and anything it started
        proc.communicate()
        return "timeout", time.perf_counter() - t0, None
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out, re.M)
    status = "survived" if proc.returncode == 0 else "killed"     # 2 (a collection error) is a detection too
    if status == "killed" and not failed:
        failed = [out.strip().splitlines()[-1][:200]]
    return status, time.perf_counter() - t0, failed


def apply(root, m):
    path = root / "minisv" / f"{m['module']}.py"
    original = path.read_text()
    lines = original.splitlines(keepends=True)
    if lines[m["line"] - 1] != m["original"]:
        raise SystemExit(f"{m['id']}: line {m['line']} of {path} is not the recorded original; rerun from a "
                         f"matching revision")
    path.write_text("".join(lines[:m["line"] - 1]) + m["mutated"] + "".join(lines[m["line"]:]))
    return path, original


def summarize(results):
    per = defaultdict(lambda: defaultdict(int))
    for r in results:
        per[r["module"]][r["status"]] += 1
    lines = ["| module | mutants | killed | timeout | survived | score |", "|---|---|---|---|---|---|"]
    tot = defaultdict(int)
    for module in sorted(per):
        c = per[module]
        n = sum(c.values())
        for k in ("killed", "timeout", "survived"):
            tot[k] += c[k]
        lines.append(f"| {module} | {n} | {c['killed']} | {c['timeout']} | {c['survived']} | "
                     f"{(c['killed'] + c['timeout']) / n:.0%} |")
    n = sum(tot.values())
    if n:
        lines.append(f"| all | {n} | {tot['killed']} | {tot['timeout']} | {tot['survived']} | "
                     f"{(tot['killed'] + tot['timeout']) / n:.0%} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modules", nargs="+", default=list(MODULE_TESTS))
    p.add_argument("--per-module", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rev", default="HEAD", help="the commit to copy and mutate (default: HEAD)")
    p.add_argument("--timeout-factor", type=float, default=3.0)
    p.add_argument("--min-timeout", type=float, default=180.0)
    p.add_argument("--rerun", help="a previous --out file: run its survived and timed-out mutants again")
    p.add_argument("--ids", nargs="+", help="only these mutant ids")
    p.add_argument("--list", action="store_true", help="print the sampled mutants and stop")
    p.add_argument("--resume", action="store_true", help="skip the mutants --out already holds")
    p.add_argument("--out", default="mutants.jsonl")
    args = p.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="minisv-mutate-"))
    try:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", args.rev], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
        if args.rerun:
            previous = [json.loads(line) for line in open(args.rerun)]
            mutants = [m for m in previous if m["status"] != "killed"]
        else:
            mutants = [m for module in args.modules
                       for m in sample(module, (root / "minisv" / f"{module}.py").read_text(), args.per_module,
                                       args.seed)]
        if args.ids:
            mutants = [m for m in mutants if m["id"] in args.ids]
        if args.list:
            for m in mutants:
                print(f"{m['id']:40s} {m['original'].strip()!r:.70} -> {m['mutated'].strip()!r:.70}")
            print(f"{len(mutants)} mutants")
            return
        where = subprocess.run([sys.executable, "-c", "import minisv; print(minisv.__file__)"], cwd=root,
                               env=dict(os.environ, PYTHONPATH=str(root)), capture_output=True, text=True).stdout
        if not where.startswith(str(root)):
            raise SystemExit(f"the copy imports minisv from {where.strip()}, not from {root}")
        done = [json.loads(line) for line in open(args.out)] if args.resume and os.path.exists(args.out) else []
        results = [r for r in done if r["id"] in {m["id"] for m in mutants}]
        mutants = [m for m in mutants if m["id"] not in {r["id"] for r in done}]
        baseline, broken = {}, {}
        for m in mutants:
            module = m["module"]
            files = test_files(root, module)
            if module not in baseline:      # tests failing unmutated are deselected: they cannot tell anything
                status, seconds, failed = run_tests(root, files, timeout=3600, stop=False)
                baseline[module], broken[module] = seconds, failed if status != "survived" else []
                print(f"[{module}] unmutated: {status} in {seconds:.0f} s ({' '.join(files)})"
                      + (f"; deselected, failing unmutated: {' '.join(failed)}" if failed else ""), flush=True)
            path, original = apply(root, m)
            try:
                status, seconds, failed = run_tests(root, files, max(args.min_timeout,
                                                                     args.timeout_factor * baseline[module]),
                                                    deselect=broken[module])
            finally:
                path.write_text(original)
            r = {k: m[k] for k in ("id", "module", "line", "kind", "original", "mutated")}
            r |= {"status": status, "seconds": round(seconds, 1), "failed": failed[0] if failed else None,
                  "tests": files, "deselected": broken[module], "rev": args.rev}
            results.append(r)
            with open(args.out, "a") as f:
                f.write(json.dumps(r) + "\n")
            print(f"{status:8s} {seconds:6.0f} s  {m['id']:40s} {m['original'].strip()!r:.60} -> "
                  f"{m['mutated'].strip()!r:.60}  {r['failed'] or ''}", flush=True)
        print(summarize(results))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
