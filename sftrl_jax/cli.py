"""The ``sftrl-jax`` command line."""

from __future__ import annotations

import argparse
import sys
import time


def mesh_arg(text: str) -> dict[str, int]:
    """``"fsdp=-1,tensor=1"`` -> ``{"fsdp": -1, "tensor": 1}``: the ``--mesh`` argument type (argparse errors)."""
    spec = {}
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"mesh: expected axis=size, got {part!r}")
        try:
            spec[key.strip()] = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"mesh.{key.strip()}: expected an integer, got {value!r}") from None
    return spec


def _check_convert_destination(dst: str, *, overwrite: bool) -> None:
    """Before anything is loaded: ``dst`` must be (or become) a folder, and an existing model or any other
    content there is replaced only with ``--overwrite``."""
    from pathlib import Path

    destination = Path(dst)
    for path in (destination, *destination.parents):
        if path.exists() and not path.is_dir():
            raise FileExistsError(f"destination {destination}: {path} is a file, not a folder; choose another "
                                  "destination")
    if destination.is_dir() and any(destination.iterdir()) and not overwrite:
        raise FileExistsError(f"destination {destination} is not empty; pass --overwrite to write over what is "
                              "there, or choose a new folder")


def cmd_convert(args: argparse.Namespace) -> int:
    from .checkpointing import is_orbax_model_dir, load_model, save_model
    from .models import ModelOptions, load_pretrained, save_pretrained
    from .sharding import make_mesh

    _check_convert_destination(args.dst, overwrite=args.overwrite)
    mesh = make_mesh(args.mesh)
    target = args.to or ("hf" if is_orbax_model_dir(args.src) else "orbax")
    start = time.time()
    if target == "orbax":
        model, _ = load_pretrained(ModelOptions(path=args.src, dtype=args.dtype or "float32"), mesh)
        out = save_model(model, args.dst)
    else:
        # without --dtype the parameters keep the dtype they were saved in
        model, _ = load_model(args.src if args.dtype is None else ModelOptions(path=args.src, dtype=args.dtype), mesh)
        out = save_pretrained(model, args.dst, max_shard_size=args.max_shard_size)
    print(f"wrote {target} checkpoint {out} ({time.time() - start:.1f}s)")
    return 0


def _load_config(args: argparse.Namespace):
    """A config command's config: ``--config FILE`` plus overrides, built as the class of its kind."""
    from .config import load_config
    from .kinds import config_class

    return load_config(config_class(args.command), args.config, args.overrides)


def cmd_sft(args: argparse.Namespace) -> int:
    from .sft import run_sft

    config = _load_config(args)
    result = run_sft(config, resume=args.resume, force=args.force)
    print(f"sft: {result.steps} steps; metrics {result.output_dir / 'metrics.jsonl'}; model {result.final_dir}")
    return 0


def cmd_rl(args: argparse.Namespace) -> int:
    from .rl import run_rl

    config = _load_config(args)
    result = run_rl(config, resume=args.resume, force=args.force)
    print(f"rl: {result.steps} steps; metrics {result.output_dir / 'metrics.jsonl'}; model {result.final_dir}")
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    from .pipeline import run_pipeline

    config = _load_config(args)
    summary = run_pipeline(config, resume=args.resume, force=args.force)
    for row in summary["stages"]:
        print(f"stage {row['stage']} {row['kind']}: {row['steps']} steps; probe {row['start']} -> {row['end']}")
    print(f"pipeline: {config.output_dir}/cross_stage.png, {config.output_dir}/boundaries.json")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .experiments.demo import run_demo

    report = run_demo(args.out, quick=args.quick, seeds=args.seeds)
    print(f"demo: held-out accuracy base {100 * report['base_accuracy']:.1f}% "
          f"-> SFT {100 * report['sft_accuracy']:.1f}% "
          f"-> SFT+RL {100 * report['rl_accuracy']:.1f}% on {report['num_test_problems']} problems "
          f"(seed spread {100 * report['seed_spread_std']:.1f} points; {report['seconds']:.0f} s)")
    print(f"demo: report {args.out}/report.md")
    return 0


def _use_cpu_devices(count: int) -> None:
    """Ask XLA for ``count`` host (CPU) devices, if JAX is not initialised yet and the user did not choose."""
    import os

    flags = os.environ.get("XLA_FLAGS", "")
    if "jax" not in sys.modules and "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


def cmd_repro(args: argparse.Namespace) -> int:
    out = args.out or f"runs/repro_{args.experiment}"
    if args.experiment == "bugs":
        _use_cpu_devices(8)  # LUFFY's 8 data-parallel ranks (on CPU: 8 simulated devices)
        from .experiments.repro_bugs import run_repro_bugs as run
    elif args.experiment == "coupling":
        from .experiments.repro_coupling import run_repro_coupling as run
    else:
        from .experiments.repro_mixed import run_repro_mixed as run
    if args.task != "arithmetic" and args.experiment != "coupling":
        raise ValueError(f"--task {args.task}: only repro coupling runs another task than the arithmetic one")
    if args.base is not None and args.experiment != "mixed":
        raise ValueError(f"--base {args.base}: only repro mixed takes a base model choice")
    options = {"task": args.task} if args.experiment == "coupling" else {}
    if args.experiment == "mixed" and args.base is not None:
        options["base"] = args.base
    report = run(out, quick=args.quick, seeds=args.seeds, **options)
    for line in report.get("findings", [report.get("finding")]):
        print(f"repro {args.experiment}: {line.removeprefix('- ')}")
    print(f"repro {args.experiment}: report {out}/report.md ({report['seconds']:.0f} s)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation import AVERAGES, run_eval

    config = _load_config(args)
    results = run_eval(config, force=args.force)
    averages = "".join(f"; {name} average {100 * results[f'{key}_average']:.1f}%"
                       for key, name in AVERAGES.items() if results[f"{key}_average"] is not None)
    print(f"eval: results {config.output_dir}/results.json{averages} (grader: reward.kind={results['grader']})")
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from .aot import main_compile

    return main_compile(args.config, args.topology, args.overrides, json_out=args.json, kind=args.kind,
                        quiet=args.quiet)


def cmd_split(args: argparse.Namespace) -> int:
    from .data.split import split_file

    result = split_file(args.src, args.out_train, args.out_heldout, heldout=args.heldout, seed=args.seed)
    print(f"split: {result.summary()}")
    return 0


def _has_accelerator() -> bool:
    """A TPU (Google PCI device), NVIDIA or AMD GPU is attached (the checks JAX's own start-up makes)."""
    import glob
    import os

    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            if open(vendor).read().strip() == "0x1ae0":  # Google: TPU chips
                return True
        except OSError:
            pass
    return any(os.path.exists(p) for p in ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")) \
        or bool(glob.glob("/dev/accel*"))


def _quiet_cpu_only_start(command: str) -> None:
    """Keep installed accelerator plugins (libtpu, jax-cuda12-plugin: the ``aot`` extra) from probing for
    hardware that is not there: on a host without a TPU or GPU, or for ``compile`` (which needs no
    accelerator backend, only the topology API), default ``JAX_PLATFORMS`` to ``cpu``. An explicit
    ``JAX_PLATFORMS`` (or ``JAX_FORCE_TPU_INIT``) wins; a host with a TPU or GPU is left alone. A CPU-only
    start imports JAX with the CUDA plugin's load-time log lines filtered out
    (:func:`_import_jax_without_plugin_noise`)."""
    import os

    if "jax" in sys.modules or "JAX_FORCE_TPU_INIT" in os.environ:
        return
    if "JAX_PLATFORMS" not in os.environ and (command == "compile" or not _has_accelerator()):
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # TSL's INFO lines, where a library logs through TSL
    if os.environ.get("JAX_PLATFORMS") == "cpu":
        _import_jax_without_plugin_noise()


# What the CUDA plugin's libraries print to stderr as they load on a host without CUDA (C++ logging that no
# environment variable turns off): dropped while JAX is imported and its plugins are discovered.
_PLUGIN_NOISE = ("cudart_stub.cc", "All log messages before absl::InitializeLog() is called")


def _import_jax_without_plugin_noise() -> None:
    """Import JAX and discover its plugins (what its first use would do) with the process's stderr (file
    descriptor 2, where C++ logs go) captured, then pass on everything but :data:`_PLUGIN_NOISE` lines.
    No backend is created, so ``jax.distributed.initialize`` may still follow."""
    import os
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import jax  # noqa: F401
            from jax._src import xla_bridge

            discover = getattr(xla_bridge, "_discover_and_register_pjrt_plugins", None)  # JAX's own start-up step
            if discover is not None:
                discover()
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if not any(noise in line for noise in _PLUGIN_NOISE)))
            sys.stderr.flush()


def _config_command(sub, name: str, run, *, help: str, description: str, example: str,
                    resume_help: str | None = None) -> argparse.ArgumentParser:
    """A subcommand that takes ``--config FILE`` plus dotted ``key=value`` overrides (and maybe ``--resume``)."""
    p = sub.add_parser(name, help=help, description=description + " Config keys: docs/config.md.")
    p.add_argument("--config", help="YAML config file")
    if resume_help:
        p.add_argument("--resume", action="store_true", help=resume_help)
        p.add_argument("--force", action="store_true",
                       help="with --resume: continue even though settings that break continuity (data, batch size, "
                            "seed, optimizer, algorithm) differ from the run's config.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=f"dotted overrides, e.g. {example}")
    p.set_defaults(func=run)
    return p


def _add_convert_command(sub) -> None:
    """``convert``: Hugging Face directory <-> orbax checkpoint."""
    p = sub.add_parser("convert", help="convert a Hugging Face directory to an orbax checkpoint, or back",
                       description="Convert between a Hugging Face model directory (config.json + safetensors) "
                                   "and an orbax checkpoint (config.json + params/). The direction is "
                                   "detected from SRC unless --to is given.")
    p.add_argument("src", help="source directory")
    p.add_argument("dst", help="destination directory (new or empty, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a destination that is not empty (replacing the model files there)")
    p.add_argument("--to", choices=["orbax", "hf"], help="target format (default: the other one)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="parameter dtype (default: float32 from HF; the saved dtype from orbax)")
    p.add_argument("--max-shard-size", default="5GB", help="safetensors shard size for --to hf (default 5GB)")
    p.add_argument("--mesh", type=mesh_arg, default={"fsdp": -1},
                   help="device mesh, e.g. 'fsdp=-1' or 'data=2,fsdp=4' (default fsdp=-1: all devices)")
    p.set_defaults(func=cmd_convert)


def _add_training_commands(sub) -> None:
    """The config-driven training subcommands: ``sft``, ``rl`` and ``pipeline``."""
    resume = "continue from the latest checkpoint in output_dir"
    _config_command(sub, "sft", cmd_sft, help="supervised fine-tuning", example="train.max_steps=10",
                    resume_help=resume,
                    description="Supervised fine-tuning with exact global-token-mean gradient accumulation "
                                "(commented example: configs/tiny_sft.yaml).")
    _config_command(sub, "rl", cmd_rl, help="GRPO reinforcement learning with a verifiable reward",
                    example="rl.kl_coef=0.001", resume_help=resume,
                    description="GRPO (verl semantics, DAPO options) on prompt files with ground truths.")
    _config_command(sub, "pipeline", cmd_pipeline, help="run SFT/RL stages in order with cross-stage measurements",
                    example="probe.every=20", resume_help="skip finished stages and resume the unfinished one",
                    description="Stages (sft | rl) each start from the previous stage's weights; the held-out "
                                "SFT loss and reward are measured throughout.")


def _add_offline_commands(sub) -> None:
    """The offline CPU experiments on the embedded task: ``demo`` and ``repro``."""
    p = sub.add_parser("demo", help="offline CPU demo: base -> SFT -> GRPO -> evaluation on an embedded task",
                       description="Builds an arithmetic word-problem task, a tokenizer and a small random model "
                                   "offline, then runs SFT, GRPO and evaluation through the normal code paths, "
                                   "and writes a report.")
    p.add_argument("--out", default="runs/demo", help="report folder (default runs/demo)")
    p.add_argument("--quick", action="store_true", help="a smaller version (one seed, fewer steps)")
    p.add_argument("--seeds", type=int, nargs="+", help="training seeds (default: 2 seeds, 1 with --quick)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("repro", help="the two papers' findings at small scale, offline on a CPU",
                       description="bugs: SFT with the correct accumulation vs the emulated DeepSpeed-offload and "
                                   "OpenRLHF mean-of-means bugs (Paper A's staircase). coupling: SFT -> RL -> SFT "
                                   "with the cross-stage probe (Paper B's non-decoupling). mixed: SFT->RL (correct "
                                   "SFT, each bug, truncated RL) vs LUFFY, CHORD and zero RL at equal compute from "
                                   "a pretrained base (Paper A's head-to-head). "
                                   "All use the demo's embedded task and write a report folder.")
    p.add_argument("experiment", choices=["bugs", "coupling", "mixed"])
    p.add_argument("--out", help="report folder (default runs/repro_<experiment>)")
    p.add_argument("--quick", action="store_true", help="a tiny version (one seed, a few steps) to check the set-up")
    p.add_argument("--seeds", type=int, nargs="+", help="training seeds (default: bugs 3, coupling 2, mixed 3)")
    p.add_argument("--task", choices=["arithmetic", "cola"], default="arithmetic",
                   help="coupling: the demo's arithmetic task (default) or the CoLA-like acceptability task, Paper B's")
    p.add_argument("--base", choices=["pretrained", "random"], default=None,
                   help="mixed: the base model, pretrained on the task's plain-text corpus (default) or random")
    p.set_defaults(func=cmd_repro)


def _add_compile_command(sub) -> None:
    """``compile``: ahead-of-time compilation of a run for a TPU slice or GPU host."""
    from .aot import COMPILABLE_KINDS

    p = sub.add_parser("compile", help="ahead-of-time compile a run's jitted functions for a TPU slice or GPU host",
                       description="Compile, on this machine (a CPU is enough), every jitted function the run "
                                   "CONFIG describes for TOPOLOGY's chips, with the real XLA:TPU / XLA:GPU "
                                   "compiler, and report per-device memory (does it fit the HBM?), FLOPs, bytes "
                                   "and the roofline bound. Only config.json is read from model.path. Needs "
                                   "pip install -e '.[aot]'. Topologies: v5e-N, v6e-N (N chips), v5p-N (N "
                                   "TensorCores = N/2 chips), KxH100, KxH200, or a JAX TPU name like v5p:2x4x4.")
    p.add_argument("--config", required=True, help="YAML config file (SFT, RL or pipeline)")
    p.add_argument("--topology", required=True, help="e.g. v5p-64, v6e-8, v5e-4, 8xh100, 16xh100, 8xh200")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    p.add_argument("--kind", choices=COMPILABLE_KINDS, help="config kind (default: the file's kind:)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. model.path=configs/models/Qwen2.5-Math-7B")
    p.set_defaults(func=cmd_compile)


def _add_split_command(sub) -> None:
    """``split``: carve a held-out file (e.g. the pipeline probe's SFT rows) out of a training file."""
    p = sub.add_parser("split", help="carve a held-out file out of a training file, deterministically",
                       description="Write TRAIN and HELDOUT from SRC: N rows chosen by SEED (the first N of a "
                                   "seeded permutation of the row numbers) go to HELDOUT, the others to TRAIN. "
                                   "Same SRC and seed, same split; both keep SRC's row order; every row lands "
                                   "in exactly one. Parquet in, parquet out; JSON lines in, JSON lines out. "
                                   "E.g. the held-out SFT file the Qwen3-0.6B pipeline configs probe "
                                   "(probe.sft_files).")
    p.add_argument("src", help="source file (.parquet or .jsonl)")
    p.add_argument("--out-train", required=True, metavar="TRAIN", help="the rows not held out (same format)")
    p.add_argument("--out-heldout", required=True, metavar="HELDOUT", help="the held-out rows (same format)")
    p.add_argument("--heldout", required=True, type=int, metavar="N", help="number of rows to hold out")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the choice (default 0)")
    p.set_defaults(func=cmd_split)


def cmd_prepare(args: argparse.Namespace) -> int:
    from .data.cola import cola_rows, write_rows

    rows, skipped = cola_rows(args.src, split=args.split)
    if not rows:
        raise ValueError(f"{args.src} (split {args.split}): no labelled CoLA rows ({skipped['bad_rows']} bad rows)")
    write_rows(rows, args.out)
    print(f"prepare {args.task}: {len(rows)} rows from {args.src} (split {args.split}) -> {args.out}; "
          f"{skipped['bad_rows']} skipped")
    return 0


def cmd_crosscheck(args: argparse.Namespace) -> int:
    out = args.out or f"runs/crosscheck_{args.action}"
    if args.action == "run":
        from .crosscheck.trl_run import run_crosscheck

        result = run_crosscheck(args.config, steps=args.steps, out=out, overrides=args.overrides)
        print(f"crosscheck run: {result['reference']} vs sftrl-jax over {len(result['steps'])} steps: largest "
              f"relative difference loss {result['max_loss_rel_diff']:.3g}, grad norm "
              f"{result['max_grad_norm_rel_diff']:.3g}, weights {result['max_weight_rel_diff']:.3g}")
    else:
        from .crosscheck.logs import run_logs

        result = run_logs(args.config, args.reference, layout=args.layout, order_path=args.order, out=out,
                          steps=args.steps, tolerance=args.tolerance, overrides=args.overrides)
        best = result["candidates"][result["best"]]
        nan = float("nan")
        print(f"crosscheck logs: verdict {result['verdict']} (closest {result['best']}: loss distance "
              f"{best['loss_distance']:.3g}, grad-norm distance "
              f"{best['grad_norm_distance'] if best['grad_norm_distance'] is not None else nan:.3g}; "
              f"margin {result['margin'] if result['margin'] is not None else nan:.3g})")
    print(f"crosscheck {args.action}: report {out}/report.md")
    return 0


def _add_crosscheck_command(sub) -> None:
    """``crosscheck run|logs``: a PyTorch SFT run next to sftrl-jax's."""
    from .crosscheck import DEFAULT_TOLERANCE

    p = sub.add_parser("crosscheck", help="compare a PyTorch SFT run with sftrl-jax (side by side with TRL, or logs)",
                       description="Put a PyTorch SFT run next to sftrl-jax's. Both actions write report.md, "
                                   "report.json and curves.png to --out.")
    actions = p.add_subparsers(dest="action", required=True)
    run = actions.add_parser("run", help="the same SFT with TRL's SFTTrainer and with sftrl-jax, step by step",
                             description="Train the SFT of CONFIG with TRL's SFTTrainer (PyTorch; pip install -e "
                                         "'.[crosscheck]') and with sftrl-jax on the same tokens, order and "
                                         "optimizer settings; compare per-step loss and gradient norm and the "
                                         "final weights.")
    logs = actions.add_parser("logs", help="which accumulation semantics a run's logged loss and grad norm match",
                              description="Replay the first steps of a run whose per-step log is FILE "
                                          "(trainer_state.json, JSONL of {step, loss, grad_norm}, or a W&B CSV "
                                          "export) in JAX under the correct accumulation and the DeepSpeed-offload "
                                          "and OpenRLHF mean-of-means bugs, and say which it matches.")
    for p in (run, logs):
        p.add_argument("--config", required=True, help="SFT config file (model, data, optimizer, batch sizes)")
    run.add_argument("--steps", type=int, help="optimizer steps (default: 10, or train.max_steps if fewer)")
    run.add_argument("--out", help="report folder (default runs/crosscheck_run)")
    logs.add_argument("--reference", required=True, metavar="FILE", help="the reference run's per-step log")
    logs.add_argument("--layout", metavar="RANKSxMICROSxBATCH",
                      help="the reference's data-parallel ranks x micro-steps x sequences per rank per micro-step, "
                           "e.g. 8x8x1 (their product is train.global_batch_size; default: train.emulate_ranks or 1 "
                           "x N x train.emulate_micro_batch_size or train.micro_batch_size)")
    logs.add_argument("--order", metavar="FILE", help="JSON list of the row indices of data.train_files in the order "
                                                      "the reference consumed them (default: file order)")
    logs.add_argument("--steps", type=int, help="replay only the reference's first N steps")
    logs.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                      help=f"largest distance a matching semantics may have (default {DEFAULT_TOLERANCE:g})")
    logs.add_argument("--out", help="report folder (default runs/crosscheck_logs)")
    for p in (run, logs):
        p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. mesh.fsdp=1")
        p.set_defaults(func=cmd_crosscheck)


def _add_prepare_command(sub) -> None:
    """``prepare``: a task's raw data as the rows SFT and RL read."""
    p = sub.add_parser("prepare", help="turn a task's raw data into SFT/RL rows (cola: CoLA acceptability)",
                       description="Write OUT (.parquet or .jsonl) with one row per labelled example of SRC in the "
                                   "layout SFT and RL both read (prompt, target, reward_model.ground_truth), so one "
                                   "file feeds both stages. cola: SRC is tfds:glue/cola/SPLIT, the hub's "
                                   "nyu-mll/glue (config cola) or a local file of {sentence, label, idx} rows.")
    p.add_argument("task", choices=["cola"], help="the task")
    p.add_argument("src", help="the raw data: a file, tfds:NAME/CONFIG/SPLIT or a hub id")
    p.add_argument("--split", default="train", help="split to read (hub ids, directories; default train)")
    p.add_argument("--out", required=True, help="output file (.parquet or .jsonl)")
    p.set_defaults(func=cmd_prepare)


def build_parser() -> argparse.ArgumentParser:
    """The ``sftrl-jax`` parser: one subcommand per entry point, listed in this order in ``--help``."""
    parser = argparse.ArgumentParser(prog="sftrl-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_convert_command(sub)
    _add_training_commands(sub)
    _add_offline_commands(sub)
    eval_parser = _config_command(sub, "eval", cmd_eval, help="evaluate a model on reasoning benchmarks",
                                  example="sampling.n=4",
                                  description="Generate with the in-JAX sampler and grade with math-verify. Resumes "
                                              "from output_dir/generations.jsonl.")
    eval_parser.add_argument("--force", action="store_true",
                             help="reuse output_dir/generations.jsonl even when its settings file is missing or "
                                  "names other settings, model files or data")
    _add_compile_command(sub)
    _add_split_command(sub)
    _add_prepare_command(sub)
    _add_crosscheck_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    import logging

    args = build_parser().parse_args(argv)
    _quiet_cpu_only_start(args.command)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("absl", "orbax", "jax._src"):  # per-save orbax chatter; our own loggers report progress
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from .signals import Stopped

    try:
        return args.func(args)
    except Stopped as err:  # SIGTERM / SIGINT: the run stopped cleanly (sftrl_jax.signals)
        print(f"sftrl-jax {args.command}: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:  # SIGINT outside a run's loop (loading, converting, ...)
        print(f"sftrl-jax {args.command}: interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, FileExistsError, KeyError, ValueError, FloatingPointError, RuntimeError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"sftrl-jax {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
