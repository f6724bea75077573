"""Render every generated table in README.md and docs/*.md from the result files under docs/results/.

    python scripts/render_docs.py                     # re-render every marked block from docs/results/
    python scripts/render_docs.py --check             # exit 1 (and say which) if a page is not up to date
    python scripts/render_docs.py --import-demo runs/demo/report.json
    python scripts/render_docs.py --import-repro-bugs runs/repro_bugs/report.json
    python scripts/render_docs.py --import-repro-coupling runs/repro_coupling/report.json
    python scripts/render_docs.py --import-repro-mixed runs/repro_mixed/report.json

A generated block sits between two marker comments, ``<!-- results:NAME:start -->`` and
``<!-- results:NAME:end -->`` (docs/scaling.md's compile table keeps its older
``<!-- compile-table:start/end -->`` pair, the same as ``results:compile``). Everything between a
pair is overwritten, so edit this module or re-import a run, never the block. Blocks:

- ``demo``, ``repro-bugs``, ``repro-coupling``, ``repro-mixed``: one command's ``report.json`` (``sftrl-jax demo``,
  ``sftrl-jax repro bugs|coupling|mixed``), imported with ``--import-*`` into ``docs/results/<name>.json``
  together with the command, the run's date (the report's modification time) and the machine and
  commit it was imported on (run the import on the machine that ran the command, or describe it with
  ``--machine``). Until a report is imported the block says so and names the commands.
  Reports of ``--quick`` runs are refused (they are set-up checks, not results) unless ``--allow-quick``.
- ``compile``: the ``sftrl-jax compile`` JSON files under ``docs/results/compile/`` written by
  ``scripts/compile_configs.py`` (:mod:`sftrl_jax.tools.compile_table`, whose table this renders; the
  script renders the pages after compiling).
- ``rollout-model``: the modelled generation time of both sampling engines that the same files hold for their
  RL samplers (``rollouts``, :mod:`sftrl_jax.aot.rollout`).
- ``bench-rollout``: the rollout benchmark's ``docs/results/bench_rollout_cpu.json`` (``scripts/bench.py
  --sections rollout --json``).

Rendering reads nothing but the result files, so it is deterministic; ``tests/test_render_docs.py``
checks that the committed pages equal their rendering.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from . import ROOT
from .compile_table import render_rollouts, render_table

MARKER = re.compile(r"<!-- (results:([a-z0-9-]+)|compile-table):start -->\n(.*?)<!-- \1:end -->", re.DOTALL)
START = re.compile(r"<!-- (?:results:[a-z0-9-]+|compile-table):start -->")


def doc_paths(root: Path = ROOT) -> list[Path]:
    """The pages that may hold generated blocks: README.md and docs/*.md."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


# --------------------------------------------------------------------------------------------------
# one command's report.json, imported with its provenance


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _provenance(result: dict, name: str) -> str:
    """`Measured with `<command>` on <date> (<machine>; sftrl-jax <version>, commit <commit>)`."""
    machine = result.get("machine", {})
    parts = [machine["description"]] if machine.get("description") else []
    if machine.get("cpu_count"):
        parts.append(f"{machine['cpu_count']} CPU cores ({machine.get('cpu', 'unknown CPU')})")
    if machine.get("memory_gib"):
        parts.append(f"{machine['memory_gib']:.0f} GiB")
    packages = machine.get("packages", {})
    software = [f"Python {machine['python']}"] if machine.get("python") else []
    software += [f"{p} {packages[p]}" for p in ("jax", "jaxlib") if packages.get(p)]
    if software:
        parts.append(", ".join(software))
    code = f"sftrl-jax {result['version']}" if result.get("version") else ""
    if result.get("commit"):
        code += f"{', ' if code else ''}commit {result['commit']}"
    if code:
        parts.append(code)
    quick = " **(quick mode: a set-up check, not a result)**" if result["report"].get("quick") else ""
    return (f"Measured with `{result['command']}` on {result['date']}{quick} ({'; '.join(parts) or 'machine not recorded'}); "
            f"{result['report']['seconds']:.0f} s wall. Source: `docs/results/{name}.json`.")


def render_demo(result: dict) -> str:
    report = result["report"]
    base = report["base_accuracy"]
    runs = report["runs"]
    rows = "\n".join(f"| seed {r['seed']} | {_pct(base)} | {_pct(r['sft_accuracy'])} | {_pct(r['rl_accuracy'])} |"
                     for r in runs)
    per_seed = ", ".join(f"{100 * (r['rl_accuracy'] - r['sft_accuracy']):+.1f}" for r in runs)
    verdict = "PASSED" if report["accepted"] else "NOT MET"
    answers = "\n".join(
        f"| {r['seed']} | {stage} | {a['stopped_after_two_steps']} / {a['three_step_problems']} | "
        f"{a['wrong_steps']} / {a['steps']} |"
        for r in runs for stage, a in (("SFT", r["answers"]["sft"]), ("SFT→RL", r["answers"]["rl"])))
    return f"""{_provenance(result, "demo")}

| held-out accuracy ({report['num_test_problems']} problems) | base | SFT | SFT→RL |
|---|---|---|---|
{rows}
| mean | {_pct(base)} | {_pct(report['sft_accuracy'])} | {_pct(report['rl_accuracy'])} |

Margins: SFT − base = {100 * report['margin_sft_over_base']:.1f} points;
SFT→RL − SFT = {100 * report['margin_rl_over_sft']:.1f} points (per seed: {per_seed}).
Seed-to-seed spread (the larger std over seeds of the SFT and SFT→RL accuracies): {100 * report['seed_spread_std']:.1f} points.
Acceptance (each margin larger than the spread, the order holding for every seed): **{verdict}**.
The teacher's boxed answer is right on {_pct(report['teacher_accuracy_on_sft_data'])} of the SFT problems.

How the held-out answers go wrong (greedy; counted from `seed*/eval_*/generations.jsonl`):

| seed | model | three-step problems stopped after two steps | wrong arithmetic steps |
|---|---|---|---|
{answers}
"""


def render_repro_bugs(result: dict) -> str:
    report = result["report"]
    rows, labels, settings = report["summary"], report.get("labels", {}), report["settings"]

    def cell(bug: str, key: str, scale: float, digits: int) -> str:
        return f"{scale * rows[bug][key]['mean']:.{digits}f} ± {scale * rows[bug][key]['std']:.{digits}f}"

    table = "\n".join(f"| {labels.get(bug, bug)} | {cell(bug, 'accuracy', 100, 1)} | {cell(bug, 'heldout_loss', 1, 3)} | "
                      f"{cell(bug, 'final_train_loss', 1, 3)} | {cell(bug, 'mean_grad_norm', 1, 2)} |" for bug in rows)
    seeds = report["seeds"]
    train = settings["sft"]["train"]
    return f"""{_provenance(result, "repro_bugs")}

{len(seeds)} seed(s) per setting ({', '.join(map(str, seeds))}); {train['max_steps']} steps of global batch {train['global_batch_size']} on {settings['ranks']} data-parallel ranks;
{settings['splits']['test']} held-out test problems; held-out SFT loss on {settings['splits']['heldout']} held-out teacher traces.

| setting | held-out accuracy % | held-out SFT loss | final train loss | mean grad norm |
|---|---|---|---|---|
{table}

(mean ± std over seeds.) What this run found (the report's own comparison with the seed spread):

{chr(10).join(report['findings'])}
"""


def render_repro_coupling(result: dict) -> str:
    report = result["report"]
    settings, seeds = report["settings"], report["seeds"]
    bold = {(1, "probe_sft_loss"), (2, "probe_reward")}  # Paper B's two effects: stage 2's loss, stage 3's reward

    def cell(index: int, row: dict, key: str) -> str:
        end = f"{row[f'end_{key}']['mean']:.3f}"
        end = f"**{end}**" if (index, key) in bold else end
        return f"{row[f'start_{key}']['mean']:.3f} → {end} ± {row[f'end_{key}']['std']:.3f}"

    table = "\n".join(f"| {row['stage']} | {row['kind'].upper()} | {row['steps']} | {cell(i, row, 'probe_sft_loss')} | "
                      f"{cell(i, row, 'probe_reward')} |" for i, row in enumerate(report["boundaries"]))
    sampled = " (a sampled mean@1 at temperature 1 beside it in the run's metrics.jsonl)" \
        if settings.get("task") == "cola" else ""
    return f"""{_provenance(result, REPORTS_BY_FILE[result.get("kind", "repro-coupling")])}

{len(seeds)} seed(s) ({', '.join(map(str, seeds))}); probe every {settings['probe_every']} steps: SFT loss on {settings['splits']['heldout']} held-out teacher traces,
greedy reward on {settings['splits']['probe']} held-out prompts{sampled}.

| stage | kind | steps | SFT loss start → end | reward start → end |
|---|---|---|---|---|
{table}

(mean over seeds at the stage's start → mean ± std at its end; in bold the two values Paper B's effects
are about.) What this run found:

{chr(10).join(report['findings'])}
"""


def render_repro_mixed(result: dict) -> str:
    report = result["report"]
    rows = "\n".join(f"| {row['label']} | {_pct(row['accuracy'])} | {', '.join(_pct(a) for a in row['per_seed'])} | "
                     f"{100 * row['spread']:.1f} | {row['flops']:.3g} |" for row in report["methods"].values())
    base = f"; base model {_pct(report['base_accuracy'])}" if "base_accuracy" in report else ""
    # a report from before the pretrained base states one finding, a later one a finding per claim
    findings = "\n".join(report["findings"]) if "findings" in report else f"{report['finding']}."
    return f"""{_provenance(result, REPORTS_BY_FILE[result.get("kind", "repro-mixed")])}

{len(report['seeds'])} seed(s) ({', '.join(map(str, report['seeds']))}); {report['num_test_problems']} held-out problems, greedy{base}.

| method | held-out accuracy (mean) | per seed | seed spread (std, points) | counted FLOPs (mean) |
|---|---|---|---|---|
{rows}

{findings}
"""


# name in the markers -> (result file under docs/results, renderer, command that produces the report)
REPORTS: dict[str, tuple[str, Callable[[dict], str], str]] = {
    "demo": ("demo.json", render_demo, "sftrl-jax demo"),
    "repro-bugs": ("repro_bugs.json", render_repro_bugs, "sftrl-jax repro bugs"),
    "repro-coupling": ("repro_coupling.json", render_repro_coupling, "sftrl-jax repro coupling"),
    "repro-coupling-cola": ("repro_coupling_cola.json", render_repro_coupling, "sftrl-jax repro coupling --task cola"),
    "repro-mixed": ("repro_mixed.json", render_repro_mixed, "sftrl-jax repro mixed"),
    "repro-mixed-random-base": ("repro_mixed_random_base.json", render_repro_mixed,
                                "sftrl-jax repro mixed --base random"),
}
# the variant each block shows: a report's settings name its task (coupling) and base model (mixed); reports
# written before those choices existed have neither, and are of the first kind there was
VARIANT_OF = {"repro-coupling": ("task", "arithmetic"), "repro-coupling-cola": ("task", "cola"),
              "repro-mixed": ("base", "pretrained"), "repro-mixed-random-base": ("base", "random")}
VARIANT_DEFAULT = {"task": "arithmetic", "base": "random"}
# an imported result's kind -> its file's name under docs/results (for the provenance line)
REPORTS_BY_FILE = {name: filename.removesuffix(".json") for name, (filename, _, _) in REPORTS.items()}
REQUIRED = {"demo": ("base_accuracy", "runs", "accepted"), "repro-bugs": ("summary", "findings", "settings"),
            "repro-coupling": ("boundaries", "findings", "settings"),
            "repro-coupling-cola": ("boundaries", "findings", "settings"),
            "repro-mixed": ("methods", "verdicts", "settings"), "repro-mixed-random-base": ("methods", "settings")}
DEFAULT_OUT = {"demo": "runs/demo", "repro-bugs": "runs/repro_bugs", "repro-coupling": "runs/repro_coupling",
               "repro-coupling-cola": "runs/repro_coupling_cola", "repro-mixed": "runs/repro_mixed",
               "repro-mixed-random-base": "runs/repro_mixed"}


BENCH_ROLLOUT = "bench_rollout_cpu.json"
BENCH_ROLLOUT_COMMAND = ("python scripts/bench.py --device cpu --sections rollout --gen-repeats 1 "
                         f"--json docs/results/{BENCH_ROLLOUT}")


def render_bench_rollout(result: dict) -> str:
    """The rollout benchmark's set-up and table (``scripts/bench.py --sections rollout``)."""
    env, model, r = result["environment"], result["cpu_model"], result["rollout"]
    static, paged = r["static"], r["paged"]
    load = r.get("load_1min") or []
    lines = [
        f"Machine: {env['cpu_count']} cores ({env['cpu_model']}), Python {env['python']}, jax {env['jax']}, "
        f"{env['date']}; 1-minute load average {env['load'][0]} at the start"
        + (f", {', '.join(map(str, load))} after each round" if load else "") + ".",
        f"Model: {model['model_type']} shape, vocab {model['vocab_size']}, hidden {model['hidden_size']}, "
        f"{model['num_hidden_layers']} layers, float32. Work: {r['requests']} requests of {r['prompt']} prompt tokens, "
        f"one sample each, temperature 1, response lengths from a log-normal capped at {r['cap']} tokens (mean "
        f"{r['mean_length']:.1f}), fixed per request through per-request limits on a model without a stop id, so "
        f"both engines generate the same {r['useful_tokens']} tokens. Same KV memory: the static engine's cache of "
        f"{r['static_batch']} rows × ({r['prompt']} + {r['cap']}) positions = {r['kv_budget_tokens']} tokens; the "
        f"paged engine's pool of {r['num_pages'] - 1} pages of {r['page_size']} (plus the scratch page) for "
        f"{r['paged_slots']} slots. One timed run of each after a warm-up.",
        "",
        "| engine | useful tokens/s | slot utilisation | decode steps | time per step (prefill included) | "
        "KV bytes read per useful token | peak pages in use |",
        "|---|---|---|---|---|---|---|",
        f"| static (`sampling.engine: static`, batch {r['static_batch']}) | {static['useful_tokens_per_s']:.1f} | "
        f"{static['slot_utilisation']:.1%} | {static['decode_steps']} | "
        f"{1e3 * static['seconds'] / static['decode_steps']:.1f} ms | "
        f"{static['kv_bytes_read_per_useful_token'] / 1e6:.2f} MB | – |",
        f"| paged (`sampling.engine: paged`, {r['paged_slots']} slots, "
        f"`paged_attention: {r['paged_attention']}`) | {paged['useful_tokens_per_s']:.1f} | "
        f"{paged['slot_utilisation']:.1%} | {paged['decode_steps']} | "
        f"{1e3 * paged['seconds'] / paged['decode_steps']:.1f} ms | "
        f"{paged['kv_bytes_read_per_useful_token'] / 1e6:.2f} MB | {paged['max_pages_in_use']} of "
        f"{r['num_pages'] - 1} |",
        f"| **paged / static** | **{r['speedup']:.2f}×** (target ≥ 2.5×) | **{r['utilisation_ratio']:.2f}×** "
        f"(paged ≥ 90 % targeted) | | | **{r['kv_bytes_ratio']:.2f}× fewer** | |",
        "",
        f"The two engines' samples are identical ({r['identical_samples']:.0%} of the {r['requests']} responses "
        "token for token).",
    ]
    return "\n".join(lines) + "\n"


def render_block(name: str, results: Path) -> str:
    """The text between the markers of block ``name`` (ends with a newline)."""
    if name == "compile":
        return render_table(results)
    if name == "rollout-model":
        return render_rollouts(results)
    if name == "bench-rollout":
        path = results / BENCH_ROLLOUT
        if not path.exists():
            return f"*Not yet measured with this version: run `{BENCH_ROLLOUT_COMMAND}`.*\n"
        return render_bench_rollout(json.loads(path.read_text()))
    if name not in REPORTS:
        raise SystemExit(f"unknown results block {name!r} (known: compile, rollout-model, bench-rollout, "
                         f"{', '.join(REPORTS)})")
    filename, render, command = REPORTS[name]
    path = results / filename
    if not path.exists():
        default = DEFAULT_OUT[name]
        return (f"*Not yet measured with this version: run `{command}`, then "
                f"`python scripts/render_docs.py --import-{name} {default}/report.json`.*\n")
    return render(json.loads(path.read_text()))


def render_text(text: str, results: Path, where: str = "") -> str:
    """``text`` with every marked block re-rendered from ``results``."""
    def replace(match: re.Match) -> str:
        tag, name = match.group(1), match.group(2) or "compile"
        return f"<!-- {tag}:start -->\n{render_block(name, results)}<!-- {tag}:end -->"

    rendered, count = MARKER.subn(replace, text)
    if count != len(START.findall(text)):
        raise SystemExit(f"{where or 'text'}: a results start marker without its end marker "
                         "(or not followed by a newline)")
    return rendered


def stale_docs(root: Path = ROOT) -> list[Path]:
    results = root / "docs" / "results"
    return [p for p in doc_paths(root) if p.exists() and render_text(p.read_text(), results, str(p)) != p.read_text()]


def write_docs(root: Path = ROOT) -> list[Path]:
    """Re-render every page under ``root``; returns the pages that changed."""
    results = root / "docs" / "results"
    changed = []
    for path in doc_paths(root):
        if not path.exists():
            continue
        text = path.read_text()
        rendered = render_text(text, results, str(path))
        if rendered != text:
            path.write_text(rendered)
            changed.append(path)
    return changed


# --------------------------------------------------------------------------------------------------
# importing a run's report.json


def _git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{head} + uncommitted changes" if dirty else head


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except (OSError, ValueError):
        pass
    return None


def machine_info(description: str | None = None) -> dict:
    """The machine this runs on (meant to be the one that ran the command)."""
    packages = {}
    for name in ("sftrl-jax", "jax", "jaxlib", "flax", "optax", "transformers"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    info = {"cpu": _cpu_name(), "cpu_count": os.cpu_count(), "memory_gib": _memory_gib(),
            "platform": platform.platform(), "python": platform.python_version(), "packages": packages}
    if shutil.which("nvidia-smi"):
        gpus = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, check=False).stdout.split("\n")
        info["gpus"] = [g.strip() for g in gpus if g.strip()]
    if description:
        info["description"] = description
    return info


def _command(name: str, report: dict, out_dir: str) -> str:
    """The command line that wrote ``report`` (its flags are recorded in the report)."""
    command = REPORTS[name][2]
    if report.get("quick"):
        command += " --quick"
    if report.get("seeds") is not None and report["seeds"] != report.get("settings", {}).get("seeds"):
        command += " --seeds " + " ".join(map(str, report["seeds"]))
    if out_dir != DEFAULT_OUT[name]:
        command += f" --out {out_dir}"
    return command


def import_report(name: str, source: Path, *, root: Path = ROOT, command: str | None = None,
                  machine: str | None = None, allow_quick: bool = False) -> Path:
    """Copy ``source`` (a report.json) to ``<root>/docs/results/<name>.json`` with its provenance."""
    report = json.loads(source.read_text())
    missing = [key for key in REQUIRED[name] if key not in report]
    if missing:
        raise SystemExit(f"{source}: not a `{REPORTS[name][2]}` report (no {', '.join(missing)})")
    if name in VARIANT_OF:
        key = VARIANT_OF[name][0]
        value = report.get("settings", {}).get(key, VARIANT_DEFAULT[key])
        if value != VARIANT_OF[name][1]:
            raise SystemExit(f"{source}: a report of the {value} {key}; import it with --import-"
                             f"{next(n for n, v in VARIANT_OF.items() if v == (key, value))}")
    if report.get("quick") and not allow_quick:
        raise SystemExit(f"{source}: a --quick run is a set-up check, not a result; not imported "
                         "(--allow-quick imports it anyway)")
    try:
        out_dir = str(source.resolve().parent.relative_to(Path.cwd()))
    except ValueError:
        out_dir = str(source.resolve().parent)
    mtime = datetime.datetime.fromtimestamp(source.stat().st_mtime, datetime.UTC)
    result = {"kind": name, "command": command or _command(name, report, out_dir),
              "date": mtime.date().isoformat(), "imported": datetime.date.today().isoformat(),
              "source": str(source), "version": _package_version(), "commit": _git_commit(),
              "machine": machine_info(machine), "report": report}
    target = root / "docs" / "results" / REPORTS[name][0]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    return target


def _package_version() -> str | None:
    try:
        return metadata.version("sftrl-jax")
    except metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in REPORTS:
        parser.add_argument(f"--import-{name}", metavar="REPORT_JSON", type=Path,
                            help=f"import a `{REPORTS[name][2]}` report.json into docs/results/, then render")
    parser.add_argument("--command", help="the command line that produced the imported report (default: "
                                          "rebuilt from the report's flags and folder)")
    parser.add_argument("--machine", help="a description of the machine that ran it (e.g. '1x H200 host')")
    parser.add_argument("--allow-quick", action="store_true", help="import a --quick report too")
    parser.add_argument("--check", action="store_true", help="only check that every page is up to date")
    parser.add_argument("--root", type=Path, default=ROOT, help=argparse.SUPPRESS)  # a copy of the repo (tests)
    args = parser.parse_args(argv)
    root = args.root.resolve()
    imports = [(name, getattr(args, f"import_{name.replace('-', '_')}")) for name in REPORTS]
    imports = [(name, path) for name, path in imports if path is not None]
    if args.check:
        if imports:
            parser.error("--check does not import")
        stale = stale_docs(root)
        for path in stale:
            print(f"not up to date: {path.relative_to(root)} (run: python scripts/render_docs.py)")
        return 1 if stale else 0
    if (args.command or args.machine) and len(imports) != 1:
        parser.error("--command and --machine go with exactly one --import-*")
    for name, path in imports:
        target = import_report(name, path, root=root, command=args.command, machine=args.machine,
                               allow_quick=args.allow_quick)
        print(f"imported {path} -> {target.relative_to(root)}")
    for path in write_docs(root):
        print(f"rendered {path.relative_to(root)}")
    return 0
