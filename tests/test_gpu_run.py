"""The one GPU command (benchmarks/gpu_run.sh) and its suite, rehearsed on the CPU as a first GPU run would go:
every phase of the real control flow (tiny model, the Triton interpreter, an eager stand-in for graph capture),
the files that would come back from the device, a failure that must not lose the other phases, a kill that must
keep what was written. Timings here are CPU timings of a tiny model and say nothing about GPU speed."""

import json
import os
import signal
import subprocess
import sys
import threading
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

from tests import bench_scripts

BENCH = bench_scripts.BENCH
SCRIPTS = {  # the modules these tests load, by file
    "gpu_suite": "gpu/gpu_suite.py",
    "rungs": "gpu/rungs.py",
    "suite_parts": "gpu/suite_parts.py",
    "ladder_table": "gpu/ladder_table.py",
    "gpu_run": "machine/gpu_run.py",
    "phases": "machine/phases.py",
    "wheels": "machine/wheels.py",
    "run_folder": "run_folder.py",
}


def _module(name):
    """A benchmark script under test, loaded by its path."""
    return bench_scripts.load(SCRIPTS[name])


def _rungs(part):
    """The names of a suite part's rungs, from the one table of rungs."""
    return [r.name for r in _module("rungs").rungs(part)]


def _gpu_run(out, *args, timeout=900):
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(
        ["bash", str(BENCH / "gpu_run.sh"), "--rehearse", "--out", str(out), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _load(path):
    return json.loads(Path(path).read_text())


def test_rehearsal_runs_every_phase_and_brings_back_at_most_8_files(tmp_path):
    run = _gpu_run(tmp_path)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert 1 <= len(files) <= 8 and not [f for f in files if f.endswith(".tmp")], files
    record = _load(tmp_path / "run.json")
    assert record["ok"] and set(record["phases"]) == {
        "install",
        "env",
        "suite",
        "kernels",
        "tensorrt",
        "memory",
        "parallel",
        "torchao",
        "compile",
        "train",
    }
    for opt_in in ("train", "torchao"):
        assert record["phases"].pop(opt_in) == {"status": "skipped", "reason": f"opt-in (--only {opt_in})"}
    assert all(p["status"] == "ok" for p in record["phases"].values()), record["phases"]
    # sequence parallelism: two gloo ranks in the rehearsal (on a one-GPU machine the phase records why it did not)
    assert record["parallel"]["ran"] and record["parallel"]["worlds"]["2"]["graphed_ms_per_step"] > 0
    # and, on every machine, one rank through the sequence-parallel path with its collectives in the graphs (two
    # buckets' worth: the plain step's graph and the step cache's): on the CPU the same bits as without it
    one = record["parallel"]["one_rank"]
    assert one["sequence_parallel"]["captures"] == one["single"]["captures"] == 2
    assert one["graphed_rel_diff"] == one["step_cache_rel_diff"] == 0
    # the distribution's version (PyPI's CUDA wheel says 2.11.0 where torch.__version__ says 2.11.0+cu130)
    assert record["env"]["imports"]["kontext_rt"]["ok"] and record["env"]["packages"]["torch"] == version("torch")

    suite = _load(tmp_path / "suite.json")
    phases = _module("gpu_suite").PHASES
    assert list(suite["phases"]) == list(phases["core"]), "the phase list that --break checks against is stale"
    assert all(p["status"] == "ok" for p in suite["phases"].values())
    assert list(suite["ladder"]) == _rungs("core") and all(
        set(r) == {"kontext", "text-to-image"} for r in suite["ladder"].values()
    )
    assert set(suite["diffusers"]) == {"kontext", "text-to-image"}
    assert all(r["ms_per_step"] > 0 for r in suite["diffusers"].values())
    # on-device checks: the triton table's hoisted loop and the graph stand-in are exact, the quantizer too
    assert suite["checks"]["hoisted_equals_per_step"] and suite["checks"]["graphs_equal_no_graphs"]
    assert suite["checks"]["finite"] and suite["checks"]["fp8_quantizer_kernel"]["values_equal"]
    assert 0 < suite["fp8_drift"]["final_latent_rel_error"] < 0.1
    # the edits run on the reference rung and the best of each precision: the last, every rung having run
    best = {r.name for fp8 in (False, True) for r in _module("rungs").rungs("core", fp8)[-1:]}
    assert set(suite["end_to_end_s"]) == {"eager", *best} == {"eager", "fa3", "fp8-attention"}
    # FA3 was probed first (the rehearsal's stand-in: the emulated module on the CPU, against SDPA)
    assert all(found["ok"] and found["stand_in"] for found in suite["fa3"].values()) and len(suite["fa3"]) == 2
    assert list(suite["profile"]) == ["diffusers", "eager", "hoisted", "fp8"]  # diffusers' with its baseline
    eager_ops = {o["name"] for o in suite["profile"]["eager"]["ops"]}  # the reference ops: no kernel of ours
    assert not any(name.startswith("kontext_rt::") for name in eager_ops) and "aten::addmm" in eager_ops
    for rung in ("hoisted", "fp8"):  # the profiles name the step's own ops, which add up to the step
        found = suite["profile"][rung]
        names = {o["name"] for o in found["ops"]}
        assert "kontext_rt::qk_norm_rope" in names and 0.99 < sum(o["share"] for o in found["ops"]) <= 1.0001
    assert "kontext_rt::quantize_rows" in {o["name"] for o in suite["profile"]["fp8"]["ops"]}
    compiled = _load(tmp_path / "suite-compile.json")
    # fa3-probe only where compile went on an FA3 rung (the fastest FP8 rung of the core part: compile_on_best)
    on_fa3 = compiled["compile_on"]["attention"].startswith("fa3")
    assert compiled["compile_on"]["rung"] in ("fp8", "fp8-attention")
    assert list(compiled["phases"]) == [p for p in phases["compile"] if p != "fa3-probe" or on_fa3]
    assert list(compiled["ladder"]) == _rungs("compile") == ["compile"] and compiled["compile_backend"] == "inductor"
    assert _load(tmp_path / "kernels.json")["all_checks_ok"]
    assert isinstance(_load(tmp_path / "tensorrt.json")["tensorrt"]["importable"], bool)
    cases = _load(tmp_path / "memory.json")["cases"]
    assert len(cases) == 6 and all("error" not in c and c["finite"] for c in cases), cases
    assert (tmp_path / "suite-ladder.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    log = (tmp_path / "run.log").read_text()
    assert "[suite] [suite core" in log and "[compile] [suite compile" in log

    # the README's tables are rendered from these files: a row per rung, the figures as in the JSON
    table = _module("ladder_table").render(tmp_path)
    assert "CPU REHEARSAL" in table
    for rung in _rungs("core") + _rungs("compile"):  # the opt-in torchao part did not run
        row = {**suite["ladder"], **compiled["ladder"]}[rung]["kontext"]
        assert f"| {rung} | {row['ms_per_step']:.1f} |" in table
    assert f"| diffusers (baseline, eager bf16) | {suite['diffusers']['kontext']['ms_per_step']:.1f} |" in table
    (tmp_path / "suite-ladder.png").unlink()  # --png redraws it from both parts' JSON
    assert _module("ladder_table").redraw(tmp_path).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

    # copied into a run folder of benchmarks/results/, the files get their manifest from run.json
    manifest = _module("run_folder").gpu_manifest(tmp_path)
    assert manifest["command"] == f"bash benchmarks/gpu_run.sh --rehearse --out {tmp_path}" == record["command"]
    assert manifest["commit"] == record["commit"] == _module("run_folder").git_state()["commit"] is not None
    assert manifest["when"] == record["started_utc"] and manifest["files"] == files


def test_the_train_phase_brings_back_a_checkpoint_that_loads(tmp_path):
    """--only train: the small Kontext trained further (on the CPU here, seconds), packed into one archive beside
    its log; the archive unpacks to a checkpoint the pipeline loads."""
    import tarfile

    run = _gpu_run(tmp_path / "out", "--only", "train")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "run.json",
        "run.log",
        "small-kontext-gpu.tar.gz",
        "train_log.json",
    ]
    log = _load(tmp_path / "out" / "train_log.json")
    assert log["flux_steps"] > 0 and log["init_from"].endswith("small_kontext") and "heldout" in log["eval"]
    with tarfile.open(tmp_path / "out" / "small-kontext-gpu.tar.gz") as archive:
        archive.extractall(tmp_path, filter="data")
    from kontext_rt import Pipeline

    pipe = Pipeline.from_pretrained(tmp_path / "small-kontext", max_sequence_length=64)
    assert pipe.cfg.hidden_size == log["flux_config"]["hidden_size"]


def test_a_broken_phase_fails_the_run_and_the_others_are_still_written(tmp_path):
    run = _gpu_run(tmp_path, "--only", "kernels,tensorrt", "--break", "kernels")
    assert run.returncode == 1
    record = _load(tmp_path / "run.json")
    assert record["phases"]["kernels"]["status"] == "failed" and "on purpose" in record["phases"]["kernels"]["error"]
    assert record["phases"]["tensorrt"]["status"] == "ok" and (tmp_path / "tensorrt.json").exists()
    assert record["phases"]["suite"]["status"] == "skipped" and not record["ok"]


def test_a_broken_suite_phase_skips_what_needs_it_and_runs_the_rest(tmp_path):
    gpu_suite = _module("gpu_suite")
    assert gpu_suite.main(["--rehearse", "--out", str(tmp_path), "--break", "triton-backend"]) == 1
    suite = _load(tmp_path / "suite.json")
    phases = suite["phases"]
    assert phases["triton-backend"]["status"] == "failed"
    for name in ("triton", "hoisted", "graphs", "checks", "fp8-convert", "fp8-quantizer"):
        assert phases[name]["status"] == "skipped" and "triton-backend" in phases[name]["reason"]
    for name, need in (("fp8-drift", "fp8-convert"), ("fp8", "fp8-convert"), ("edits-fp8", "fp8")):
        assert phases[name]["status"] == "skipped" and phases[name]["reason"].startswith(f"needs {need},")
    assert all(phases[n]["status"] == "ok" for n in ("setup", "diffusers", "model", "eager", "edits-bf16"))
    assert set(suite["ladder"]) == {"eager"} and set(suite["end_to_end_s"]) == {"eager"}


def test_a_killed_suite_keeps_every_phase_it_finished(tmp_path):
    """The device tool returns only what is already written when a command hits its limit."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, str(bench_scripts.path("gpu/gpu_suite.py")), "--rehearse", "--out", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    watchdog = threading.Timer(300, os.killpg, (proc.pid, signal.SIGKILL))  # a silent child never hangs the test
    watchdog.start()
    for line in proc.stdout:
        if "] triton ..." in line:
            break
    watchdog.cancel()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    suite = _load(tmp_path / "suite.json")
    assert [n for n, p in suite["phases"].items() if p["status"] == "ok"] == [
        "setup",
        "triton-backend",
        "diffusers",
        "model",
        "fa3-probe",
        "eager",
    ]
    assert set(suite["ladder"]["eager"]) == {"kontext", "text-to-image"}
    assert (tmp_path / "suite-ladder.png").exists() and not list(tmp_path.glob("*.tmp*"))


def test_a_child_past_its_deadline_is_killed_and_recorded(tmp_path):
    gpu_run = _module("gpu_run")
    phases = _module("phases")
    with (tmp_path / "log").open("w") as log, pytest.raises(phases.PhaseError, match="deadline") as err:
        gpu_run.run_child(
            [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(120)"],
            5.0,
            dict(os.environ),
            log,
            "t",
        )
    assert err.value.details["timed_out"] and err.value.details["tail"] == ["started"]
    assert err.value.details["child_s"] < 60


def test_wheel_plan_installs_what_is_missing_and_never_a_stale_project_wheel(tmp_path):
    wheels = _module("wheels")
    names = [
        "kontext_rt-0.1.0-py3-none-any.whl",
        "diffusers-0.42.1-py3-none-any.whl",
        "charset_normalizer-3.5.3-cp312-cp312-manylinux_2_28_x86_64.whl",
    ]
    for n in names:
        (tmp_path / n).write_bytes(b"")
    manifest = {"source_digest": wheels.source_digest(), "wheels": names}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    plan = wheels.plan(tmp_path, installed=lambda dist: dist == "charset-normalizer")
    assert [p.name for p in plan["install"]] == names[:2] and plan["already_installed"] == ["charset-normalizer"]
    assert not plan["project_wheel_stale"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest | {"source_digest": "0" * 64}))
    plan = wheels.plan(tmp_path, installed=lambda dist: False)
    assert plan["project_wheel_stale"] and names[0] not in [p.name for p in plan["install"]]


def test_the_source_digest_is_the_sources_not_what_an_install_writes_beside_them(tmp_path):
    """The tree on the GPU machine carries no egg-info or byte code: the digest of the wheel's sources must not
    change with them (setuptools writes kontext_rt.egg-info into runtime/, the source root), and must change with
    any source."""
    wheels = _module("wheels")
    files = {
        "runtime/kontext_rt/__init__.py": "x = 1\n",
        "kernels/ops.py": "y = 2\n",
        "export/specs.py": "",
        "pyproject.toml": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    clean = wheels.source_digest(tmp_path)
    (tmp_path / "runtime/kontext_rt.egg-info").mkdir()
    (tmp_path / "runtime/kontext_rt.egg-info/PKG-INFO").write_text("Name: kontext-rt\n")
    (tmp_path / "kernels/__pycache__").mkdir()
    (tmp_path / "kernels/__pycache__/ops.cpython-311.pyc").write_bytes(b"\0")
    assert wheels.source_digest(tmp_path) == clean
    (tmp_path / "kernels/ops.py").write_text("y = 3\n")
    assert wheels.source_digest(tmp_path) != clean


def _fake_wheel(folder, dist, version, module):
    """A minimal valid wheel holding one empty module: enough for pip's offline --target install."""
    stem = f"{dist.replace('-', '_')}-{version}"
    info = f"{stem}.dist-info"
    files = {
        f"{module}/__init__.py": "",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(folder / f"{stem}-py3-none-any.whl", "w") as z:
        for name, text in files.items():
            z.writestr(name, text)


def test_compile_goes_on_the_fastest_core_rung_of_its_precision():
    """The compile part reads the core's ladder: FA3's FP8 attention when that rung was the fastest FP8 one (a bf16
    rung, faster or not, is another precision), the runtime's own attention otherwise, as rungs.py when none ran."""
    from types import SimpleNamespace

    suite = _module("gpu_suite")
    ms = {"fp8": 300.0, "fp8-attention": 250.0, "graphs": 100.0}
    s = SimpleNamespace(core={"ladder": {k: {"kontext": {"ms_per_step": v}} for k, v in ms.items()}}, result={})
    (rung,) = suite.compile_on_best(s)
    assert rung.name == "compile" and rung.optimize.compile and rung.fa3 and rung.optimize.attention == "fa3-fp8"
    assert s.result["compile_on"] == {"rung": "fp8-attention", "ms_per_step": 250.0, "attention": "fa3-fp8"}
    s.core["ladder"]["fp8"]["kontext"]["ms_per_step"] = 200.0
    (rung,) = suite.compile_on_best(s)
    assert not rung.fa3 and s.result["compile_on"]["rung"] == "fp8"
    s.core = {}
    assert [r.name for r in suite.compile_on_best(s)] == _rungs("compile") and s.result["compile_on"]["rung"] is None


def test_a_repacked_wheel_installs_offline_with_the_same_files(tmp_path):
    """wheels.py repack (LZMA for big members, how FlashAttention-3's wheel fits the carry): the members and their
    bytes unchanged, the big one LZMA, and pip installs it offline (pip reads wheels with zipfile)."""
    wheels = _module("wheels")
    _fake_wheel(tmp_path, "big-lib", "1.0", "big_lib")
    wheel = tmp_path / "big_lib-1.0-py3-none-any.whl"
    data = os.urandom(3000).hex().encode()  # 6000 bytes, compressible: LZMA has something to do
    with zipfile.ZipFile(wheel, "a") as z:
        z.writestr("big_lib/data.bin", data)
    with zipfile.ZipFile(wheel) as z:
        want = {i.filename: z.read(i) for i in z.infolist()}
    before, after = wheels.repack(wheel, min_bytes=4096)
    assert after < before
    with zipfile.ZipFile(wheel) as z:
        assert {i.filename: z.read(i) for i in z.infolist()} == want
        kinds = {i.filename: i.compress_type for i in z.infolist()}
    assert kinds.pop("big_lib/data.bin") == zipfile.ZIP_LZMA and set(kinds.values()) == {zipfile.ZIP_DEFLATED}
    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site), str(wheel)]
    subprocess.run(pip, check=True, capture_output=True)
    assert (site / "big_lib" / "data.bin").read_bytes() == data


def test_carried_wheels_install_offline_and_children_import_from_them(tmp_path):
    """The GPU machine's path: wheels/ installed with pip --no-index into a fresh folder on the children's
    PYTHONPATH; a package already installed is not shadowed; the folder is removed after the run."""
    folder, out = tmp_path / "wheels", tmp_path / "out"
    folder.mkdir()
    _fake_wheel(folder, "kontext-rt", "0.1.0", "kontext_rt")
    _fake_wheel(folder, "requests", "0.0.1", "requests")  # installed here (a diffusers dependency)
    _fake_wheel(folder, "carried-only", "1.0", "carried_only")
    _module("wheels").write_manifest(folder)
    run = _gpu_run(out, "--wheels", str(folder), "--only", "tensorrt")
    assert run.returncode == 0, run.stdout[-3000:]
    record = _load(out / "run.json")
    install = record["phases"]["install"]
    assert sorted(install["installed"]) == ["carried_only-1.0-py3-none-any.whl", "kontext_rt-0.1.0-py3-none-any.whl"]
    assert install["already_installed"] == ["requests"] and not install["built_from_tree"]
    imported = record["env"]["imports"]["kontext_rt"]
    assert imported["ok"] and imported["file"].startswith(install["site"])  # the carried one, not the dev install
    assert record["commit"] == _module("run_folder").git_state()["commit"]  # the wheels' manifest recorded it
    assert not Path(install["site"]).exists()


def test_rehearsal_refuses_the_results_folder():
    with pytest.raises(SystemExit):
        _module("gpu_suite").parse(["--rehearse", "--out", str(BENCH / "results")])
    with pytest.raises(SystemExit):
        _module("gpu_run").parse(["--rehearse", "--out", str(BENCH / "results" / "x")])


def test_a_misspelt_break_is_refused():
    """--break exists to prove a failure is caught: a name that breaks nothing must not pass silently."""
    with pytest.raises(SystemExit):
        _module("gpu_suite").parse(["--rehearse", "--out", "/tmp/x", "--break", "fp8-rung"])
    with pytest.raises(SystemExit):
        _module("gpu_run").parse(["--rehearse", "--out", "/tmp/x", "--break", "kernel"])


@pytest.mark.parametrize(
    "args,message",
    [
        (["--only", "train,suite"], "train runs alone"),
        (["--only", "train", "--train-minutes", "9"], "--train-minutes must be"),
        (["--train-minutes", "0"], "--train-minutes must be"),
    ],
)
def test_the_train_phase_runs_alone_and_inside_one_command(args, message, capsys):
    """train takes a command's time: with another phase, or minutes that cannot end inside one command, it is
    refused before anything runs."""
    with pytest.raises(SystemExit):
        _module("gpu_run").parse(["--out", "/tmp/x", *args])
    assert message in capsys.readouterr().err


def test_step_flops_is_the_published_kontext_figure():
    from kontext_rt.config import PRESETS

    flops = _module("suite_parts").step_flops(PRESETS["flux-kontext-dev"], 512, 4096, 4096)
    assert abs(flops / 1e12 - 165) < 5  # the 165 TFLOP per step at 8704 tokens


def test_random_models_are_drawn_in_their_dtype_and_initialised():
    from kontext_rt.config import PRESETS

    parts = _module("suite_parts")
    for model in (
        parts.random_transformer(PRESETS["tiny"], "cpu", torch.bfloat16),
        parts.random_diffusers(PRESETS["tiny"], "cpu", torch.bfloat16),
    ):
        assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in model.parameters())
        matrices = [p for p in model.parameters() if p.ndim == 2]
        assert all(p.std() > 0 for p in matrices)


def test_the_readme_gpu_tables_are_the_committed_results():
    """Every table row ladder_table renders from the results folder docs/benchmarks.md cites is in that page
    verbatim, so a claim cannot drift from the JSON it came from; and every row of the README's speed table is a
    row of that page, so the front page cannot drift from the rendered results either."""
    page = (BENCH.parent / "docs" / "benchmarks.md").read_text()
    folder = BENCH / "results" / "h200-2026-11-28-8fc0047"
    assert f"`benchmarks/results/{folder.name}/`" in page
    rows = [line for line in _module("ladder_table").render(folder).splitlines() if line.startswith("| ")]
    assert len(rows) >= 15
    missing = [row for row in rows if row not in page]
    assert not missing, missing

    readme = (BENCH.parent / "README.md").read_text()
    assert f"`benchmarks/results/{folder.name}/`" in readme
    table = readme[readme.index("| rung | Kontext ms/step |") :].split("\n\n")[0]  # the first table: the speed one
    front = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(front) >= 4, front
    page_rows = {line.strip() for line in page.splitlines()}
    drifted = [row for row in front if row.strip() not in page_rows]
    assert not drifted, drifted


def test_the_docs_show_the_table_of_rungs():
    """docs/benchmarks.md shows the ladder as rungs.py has it, row for row (ladder_table.py --rungs renders it)."""
    page = (BENCH.parent / "docs" / "benchmarks.md").read_text()
    rows = _module("ladder_table").rungs_table()
    assert len(rows) == 2 + len(_module("rungs").RUNGS)
    missing = [row for row in rows if row not in page]
    assert not missing, missing


def test_the_phases_and_goals_come_from_the_table_of_rungs():
    """A rung is one entry: the suite's phases list each rung where its precision and part put it, and a goal
    counts the rungs that name it."""
    rungs, suite = _module("rungs"), _module("gpu_suite")
    core = list(suite.PHASES["core"])
    at = core.index("fp8-convert")
    assert [p for p in core[:at] if p in rungs.BY_NAME] == [r.name for r in rungs.rungs("core", fp8=False)]
    assert [p for p in core[at:] if p in rungs.BY_NAME] == [r.name for r in rungs.rungs("core", fp8=True)]
    assert suite.PHASES["compile"][-1:] == tuple(r.name for r in rungs.rungs("compile"))
    result = {"ladder": {r.name: {"kontext": {"ms_per_step": 100.0 + i}} for i, r in enumerate(rungs.RUNGS)}}
    found = rungs.goals({**result, "end_to_end_s": {"fp8": {"28": 9.0}}})
    for goal in rungs.GOALS:
        counted = [100.0 + i for i, r in enumerate(rungs.RUNGS) if r.goal == goal.key]
        assert found[goal.key] == (9.0 if goal.key == rungs.EDIT else min(counted, default=None))
    assert found["targets"] == {g.key: g.target for g in rungs.GOALS}


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda r, R: (r.BY_NAME["fp8"], r.BY_NAME["graphs"]), "out of order"),
        (lambda r, R: (r.BY_NAME["eager"], r.BY_NAME["eager"]), "repeat"),
        (lambda r, R: (R("x", "triton", r.Optimizations(hoist=False, cuda_graphs=True), "."),), "needs hoist=True"),
        (lambda r, R: (R("x", "tensorrt", r.Optimizations(), "."),), "backend"),
        (lambda r, R: (R("x", "triton", r.Optimizations(), ".", "kontext_ms"),), "goal"),
    ],
)
def test_a_table_of_rungs_the_suite_cannot_run_is_refused(change, message):
    rungs = _module("rungs")
    with pytest.raises(ValueError, match=message):
        rungs.check(change(rungs, rungs.Rung))


def test_the_torchao_part_times_torchaos_fp8_linears_on_a_model_of_its_own(tmp_path):
    """--part torchao (gpu_run's opt-in torchao phase): torchao quantizes the linears the runtime's fp8 rung
    converts, no more and no fewer, and the rung is timed and written as the other parts' rungs are."""
    suite = _module("gpu_suite")
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run(
        [
            sys.executable,
            str(BENCH / "gpu" / "gpu_suite.py"),
            "--rehearse",
            "--part",
            "torchao",
            "--out",
            str(tmp_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    found = _load(tmp_path / "suite-torchao.json")
    assert list(found["phases"]) == list(suite.PHASES["torchao"])
    assert list(found["ladder"]) == _rungs("torchao") == ["torchao-fp8"]
    assert set(found["ladder"]["torchao-fp8"]) == {"kontext", "text-to-image"}
    from kontext_rt.config import PRESETS
    from kontext_rt.model.fp8_linear import convert

    model = _module("suite_parts").random_transformer(PRESETS["tiny"], "cpu", torch.bfloat16)
    assert found["torchao"]["linears"] == len(convert(model)) > 0  # the runtime's FP8 linears, one for one
    assert "bypassed" in found["torchao"]["rehearsal"]
    table = _module("ladder_table").render  # the table reads the part's file beside the core's
    (tmp_path / "suite.json").write_text(json.dumps({**found, "part": "core", "ladder": {}}))
    assert "| torchao-fp8 |" in table(tmp_path)
