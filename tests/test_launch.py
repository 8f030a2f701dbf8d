"""Multi-process cells (harness/launch.py): the checks before compute, the launch command, the reason a failed launch
gives, the SLURM task size; then real 2-process runs on the CPU (gloo): one cell against its 1-process twin, a resume,
and a sweep whose rank is killed."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from harness.config import ConfigError
from tests.conftest import REPO, compose

TRL_TINY = ["backend=trl", "backend.device=cpu", "backend.threads=1", "backend.progress=false",
            "train.rollout_batch_size=16", "train.micro_batch_size=4", "train.mini_batch_size=null",
            "train.save_every=1", "train.warmup_steps=0"]


def _validate(overrides: list[str]):
    from harness.cell import validate_cell

    validate_cell(compose(overrides))


@pytest.mark.parametrize(("overrides", "message"), [
    (["backend.num_processes=2"], "the native backend trains in one process; run a cell on several processes with "
                                  "backend=trl backend.num_processes=N"),
    (["backend=trl", "backend.num_processes=0"], "backend.num_processes must be an integer >= 1, got 0"),
    (["backend=trl", "backend.num_processes=2", "backend.accelerate_config=fsdp", "train.micro_batch_size=32"],
     "backend.accelerate_config=fsdp shards over GPUs; on a CPU accelerate runs the processes as DDP"),
    (["backend=trl", "backend.num_processes=2", "backend.accelerate_config=zero3", "train.micro_batch_size=32"],
     "backend.accelerate_config=zero3 shards over GPUs"),
    (["backend=trl", "backend.num_processes=2", "backend.accelerate_config=nope"],
     "backend.accelerate_config must be one of ddp, fsdp, zero2, zero3 or an accelerate config file's path, "
     "got 'nope'"),
    (["backend=trl", "backend.num_processes=2", "backend.launcher=mpirun"],
     "backend.launcher must be one of accelerate, torchrun, got 'mpirun'"),
    (["backend=trl", "backend.num_processes=2", "backend.launcher=torchrun", "backend.accelerate_config=fsdp"],
     "backend.launcher=torchrun runs DDP only"),
    pytest.param(["backend.device=cuda"], "backend.device='cuda' but this machine has no CUDA; use 'cpu' or 'auto'",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
    (["backend=trl", "backend.num_processes=2", "backend.sampler=prompt_seeded", "train.rollout_batch_size=24",
      "train.micro_batch_size=4", "train.mini_batch_size=null", "train.num_generations=8"],
     "backend.sampler=prompt_seeded needs each process's share of train.rollout_batch_size (24 / 2 processes "
     "(backend.num_processes) = 12) to hold whole groups of train.num_generations=8"),
    (["backend=trl", "backend.collective_timeout_s=0"], "backend.collective_timeout_s must be a number of seconds"),
    (["backend=trl", "backend.sampler=beam"], "backend.sampler must be one of cached, generate, prompt_seeded for "
                                              "backend=trl"),
])
def test_bad_multi_process_settings_fail_before_compute_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        _validate(overrides)


def test_a_rank_inside_someone_elses_launch_does_not_launch_again(monkeypatch):
    from harness.launch import launches

    cfg = compose(["backend=trl", "backend.num_processes=2"])
    assert launches(cfg)
    with open_dict(cfg):
        cfg.role = "baseline"
    assert not launches(cfg)  # a baseline only evaluates: one process
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not launches(compose(["backend=trl", "backend.num_processes=2"]))
    with pytest.raises(ConfigError, match=r"backend\.num_processes=4 inside a launch of 2 processes"):
        _validate(["backend=trl", "backend.num_processes=4"])
    with pytest.raises(ConfigError, match=r"prompt_seeded needs each process's share of train\.rollout_batch_size "
                                          r"\(24 / 2 processes"):
        _validate(["backend=trl", "backend.sampler=prompt_seeded", "train.rollout_batch_size=24",
                   "train.micro_batch_size=4", "train.mini_batch_size=null", "train.num_generations=8"])


def test_launch_command_names_the_accelerate_config_processes_and_port(tmp_path):
    from harness.launch import launch_command

    cfg = compose(["backend=trl", "backend.num_processes=8", "backend.accelerate_config=fsdp"])
    cmd = launch_command(cfg, tmp_path / "spec.json", port=29555)
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--config_file") + 1] == str(REPO / "conf" / "accelerate" / "fsdp.yaml")
    assert cmd[cmd.index("--num_processes") + 1] == "8" and cmd[cmd.index("--main_process_port") + 1] == "29555"
    assert cmd[-3:] == ["-m", "harness.launch", str(tmp_path / "spec.json")]
    torchrun = launch_command(compose(["backend=trl", "backend.num_processes=2", "backend.launcher=torchrun"]),
                              "s.json", port=1)
    assert torchrun[1:3] == ["-m", "torch.distributed.run"] and "--nproc_per_node=2" in torchrun


@pytest.mark.parametrize("name", ["ddp", "fsdp", "zero2", "zero3"])
def test_each_shipped_accelerate_config_is_one_accelerate_reads(name):
    """accelerate's own loader takes each file, and its layout is the sharding the memory plan assumes."""
    from accelerate.commands.config.config_args import load_config_from_file

    from harness.backends.trl_config import accelerate_config_file, accelerate_sharding

    cfg = compose(["backend=trl", f"backend.accelerate_config={name}"])
    loaded = load_config_from_file(str(accelerate_config_file(cfg)))
    expected = {"ddp": "MULTI_GPU", "fsdp": "FSDP", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED"}[name]
    assert str(loaded.distributed_type).split(".")[-1] == expected
    assert accelerate_sharding(cfg) == name
    if name.startswith("zero"):
        assert loaded.deepspeed_config["zero_stage"] == int(name[-1])


def test_a_config_file_of_ones_own_is_planned_by_its_layout(tmp_path):
    from harness.backends.trl_config import accelerate_sharding

    path = tmp_path / "mine.yaml"
    path.write_text("distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 3\n")
    assert accelerate_sharding(compose(["backend=trl", f"backend.accelerate_config={path}"])) == "zero3"


def test_grpo_config_divides_the_batch_over_the_cells_processes_and_sets_the_collective_timeout():
    from harness.backends.trl_config import grpo_config_kwargs

    cfg = compose(["backend=trl", "backend.num_processes=2", "backend.collective_timeout_s=90",
                   "train.rollout_batch_size=16", "train.micro_batch_size=4", "train.mini_batch_size=null"])
    kw = grpo_config_kwargs(cfg, "unused")
    assert (kw["gradient_accumulation_steps"], kw["steps_per_generation"], kw["ddp_timeout"]) == (2, 2, 90)


def agent_report(root: tuple[str, int, str, str], *others: tuple[str, int, str, str]) -> str:
    """A torch elastic agent's report in torch 2.13's layout (the sweep test below makes a real one): each failure
    is (time, rank, exitcode field, traceback field), the root cause last, as the agent prints it."""
    def block(i: int, failure: tuple[str, int, str, str]) -> str:
        time_, rank, code, trace = failure
        return (f"[{i}]:\n  time      : {time_}\n  host      : cpu-box\n  rank      : {rank} (local_rank: {rank})\n"
                f"  exitcode  : {code}\n  error_file: <N/A>\n  traceback : {trace}\n")
    listed = "".join(block(i + 1, f) for i, f in enumerate(others)) or "  <NO_OTHER_FAILURES>\n"
    return ("torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n" + "=" * 60 +
            "\nharness.launch FAILED\n" + "-" * 60 + f"\nFailures:\n{listed}" + "-" * 60 +
            "\nRoot Cause (first observed failure):\n" + block(0, root) + "=" * 60 + "\n")


T0, T30 = "2026-12-06_16:01:02", "2026-12-06_16:01:32"
SIGKILLED = (T0, 1, "-9 (pid: 4321)  (SIGKILL)", "Signal 9 (SIGKILL) received by PID 4321")
KILLED = "rank 1 (local_rank: 1) exited with code -9 (SIGKILL): Signal 9 (SIGKILL) received by PID 4321"
NO_TRACE = "To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html"


def test_a_failed_launch_names_the_rank_and_its_signal(tmp_path):
    from harness.launch import ERROR_FILE, LOG_FILE, failure_reason, root_cause

    assert root_cause(agent_report(SIGKILLED)) == (1, KILLED)
    assert root_cause("Traceback ...\nValueError: boom\n") is None
    # rank 0's collective lost the killed peer in the same second, and the agent names rank 0 the root cause
    assert root_cause(agent_report((T0, 0, "1 (pid: 4320)", NO_TRACE), SIGKILLED)) == (1, KILLED)
    # the agent's own SIGTERM to the others is no cause
    assert root_cause(agent_report(SIGKILLED, (T0, 0, "-15 (pid: 4320)  (SIGTERM)", "Signal 15"))) == (1, KILLED)
    # rank 1 hung (SIGSTOP): rank 0's collective timed out first; the agent killed rank 1 30 s later
    hung = agent_report((T0, 0, "1 (pid: 4320)", NO_TRACE), (T30, *SIGKILLED[1:]))
    assert root_cause(hung) == (0, "rank 0 (local_rank: 0) exited with code 1")
    (tmp_path / LOG_FILE).write_text(hung)
    rank0 = tmp_path / ERROR_FILE.format(rank=0)
    rank0.write_text(json.dumps({"reason": "RuntimeError: Timed out waiting 20000ms for recv"}))
    assert failure_reason(tmp_path, 1).startswith("rank 0 failed: RuntimeError: Timed out waiting 20000ms for recv "
                                                  "(a collective waited longer than backend.collective_timeout_s")
    # a rank 0 error where rank 1 was killed is an echo
    (tmp_path / LOG_FILE).write_text(agent_report(SIGKILLED) + "starting\nsomething broke\n")
    rank0.write_text(json.dumps({"reason": "RuntimeError: Connection reset by peer"}))
    assert failure_reason(tmp_path, 1) == KILLED
    rank0.unlink()
    since = len(agent_report(SIGKILLED).encode())  # an earlier launch's report is not this launch's reason
    assert failure_reason(tmp_path, 3, since=since) == "the launch exited with code 3: starting | something broke"
    rank0.write_text(json.dumps({"reason": "FloatingPointError: NaN loss at step 2"}))
    assert failure_reason(tmp_path, 1, since=since) == "rank 0 failed: FloatingPointError: NaN loss at step 2"
    # rank 1 raised (the agent has no traceback without @record): its own error file says why
    (tmp_path / LOG_FILE).write_text(agent_report((T0, 1, "1 (pid: 4321)", NO_TRACE)))
    (tmp_path / ERROR_FILE.format(rank=1)).write_text(json.dumps({"reason": "OSError: No space left on device"}))
    assert failure_reason(tmp_path, 1) == "rank 1 (local_rank: 1) exited with code 1: OSError: No space left on device"


def test_slurm_asks_for_the_cells_gpus():
    from tests.test_sweep import compose_sweep

    paper = compose_sweep("paper", ["hydra/launcher=slurm"], hydra_config=True)
    assert (paper.backend.name, paper.backend.num_processes, paper.backend.accelerate_config) == ("trl", 8, "fsdp")
    verl = compose_sweep("paper", ["hydra/launcher=slurm", "backend=verl", "backend.n_gpus_per_node=8"],
                         hydra_config=True)  # the whole backend node swaps
    assert verl.backend.name == "verl" and verl.hydra.launcher.gpus_per_node == 8
    assert paper.hydra.launcher.gpus_per_node == 8
    assert compose_sweep("gates", ["hydra/launcher=slurm"], hydra_config=True).hydra.launcher.gpus_per_node == 1
    two = compose_sweep("gates", ["hydra/launcher=slurm", "backend=trl", "backend.num_processes=2"], hydra_config=True)
    assert two.hydra.launcher.gpus_per_node == 2


def test_a_cell_with_more_processes_than_its_slurm_task_has_gpus_is_refused():
    from harness.sweeping.gate_sweeper import check_gpus_per_task
    from tests.test_sweep import compose_sweep

    sweep = compose_sweep("gates", ["hydra/launcher=slurm", "backend=trl"], hydra_config=True)
    cells = [compose(["backend=trl"]), compose(["backend=trl", "backend.num_processes=2"])]
    with pytest.raises(ValueError, match=r"backend\.num_processes=2 but each launcher task gets "
                                         r"hydra\.launcher\.gpus_per_node=1 GPU"):
        check_gpus_per_task(sweep, cells)
    check_gpus_per_task(compose_sweep("gates", ["backend=trl"], hydra_config=True), cells)  # this CPU: no GPUs


def test_cells_side_by_side_may_not_need_more_gpus_than_the_machine_has(monkeypatch):
    """On an 8-GPU machine (its GPU count stood in for here), two 8-process cells at once would share every GPU."""
    import torch

    from harness.sweeping.gate_sweeper import check_gpus_per_task
    from tests.test_sweep import compose_sweep

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    cells = [compose(["backend=trl", "backend.num_processes=8"])]
    with pytest.raises(ValueError, match=r"hydra\.launcher\.n_jobs=2 runs 2 cells at once, each on up to "
                                         r"backend\.num_processes=8 GPUs, but this machine has 8"):
        check_gpus_per_task(compose_sweep("gates", ["backend=trl"], hydra_config=True), cells)
    check_gpus_per_task(compose_sweep("gates", ["backend=trl", "hydra/launcher=local"], hydra_config=True), cells)
    check_gpus_per_task(compose_sweep("paper", [], hydra_config=True), cells)  # one cell after another


def test_ranks_share_the_owners_cpu_threads(monkeypatch):
    """A SLURM task's setup exports OMP_NUM_THREADS=16 for its 16 cores: its 8 ranks get 2 threads each, not 16."""
    from harness.launch import rank_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "16")
    assert (rank_threads(8), rank_threads(32), rank_threads(1)) == (2, 1, 16)
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert rank_threads(1) == len(os.sched_getaffinity(0))


def test_cells_side_by_side_get_disjoint_gpus(tmp_path):
    """``n_jobs`` cells at once on one machine: each running cell holds its own share of the GPUs (2 cells of 2
    processes on 8 GPUs: 0,1 and 4,5), a share is free again once its cell ends, and a cell too wide for its share is
    refused naming the keys."""
    from harness.launch import gpu_slot

    gpus = [str(i) for i in range(8)]
    with gpu_slot(tmp_path, 2, 2, gpus) as first, gpu_slot(tmp_path, 2, 2, gpus) as second:
        assert (first, second) == ("0,1", "4,5")
    with gpu_slot(tmp_path, 2, 4, ["3", "5", "6", "7", "0", "1", "2", "4"]) as again:
        assert again == "3,5,6,7"  # CUDA_VISIBLE_DEVICES as the machine lists them
    with pytest.raises(ValueError, match=r"2 cells side by side on 8 GPUs leave 4 GPU\(s\) per cell, not the 8 of "
                                         r"backend\.num_processes: lower hydra\.launcher\.n_jobs"):
        with gpu_slot(tmp_path, 2, 8, gpus):
            pass


def test_cells_of_several_gpus_run_after_the_baselines_and_never_beside_one_gpu_cells(monkeypatch):
    """On an 8-GPU machine (its GPU count stood in for here): n_jobs=-1 is joblib's one job per CPU, not 1; a
    one-process cell beside 2-process cells would sit on the first GPU, inside a share, and is refused; the baselines
    are launched as a batch of their own before the cells."""
    import joblib
    import torch

    from harness.sweeping.gate_sweeper import cells_at_once, check_gpus_per_task, job_batches
    from tests.test_sweep import compose_sweep

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    # joblib's own count (it honours a container's CPU quota, which os.cpu_count does not)
    assert cells_at_once({"n_jobs": -1}) == joblib.cpu_count() and cells_at_once({}) == 1
    two = [compose(["backend=trl", "backend.num_processes=2"])]
    check_gpus_per_task(compose_sweep("gates", ["backend=trl"], hydra_config=True), two)  # 2 x 2 of 8 GPUs
    with pytest.raises(ValueError, match=r"would run cells of one process \(on the first GPU\) beside cells of "
                                         r"several"):
        check_gpus_per_task(compose_sweep("gates", ["backend=trl"], hydra_config=True),
                            [*two, compose(["backend=trl"])])
    assert job_batches(list("bbcccc"), 3, first=2) == [["b", "b"], ["c", "c", "c"], ["c"]]
    assert job_batches(list("bcc"), 8) == [["b", "c", "c"]]


def test_a_rank_continues_from_the_checkpoint_its_launcher_handed_it(tmp_path, monkeypatch):
    """Inside a launch, the verified checkpoint the launcher named is taken as is (no hashing N times over); the
    checkpoint directory itself says none; a value naming another cell's checkpoints is not this cell's answer."""
    from harness.backends.trl import LAUNCH_RESUME_ENV, resume_point

    cfg = compose(["backend=trl", "resume=true", f"output_dir={tmp_path / 'cell'}"])
    ckpts = tmp_path / "cell" / "checkpoints"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv(LAUNCH_RESUME_ENV, str(ckpts / "checkpoint-6"))
    assert resume_point(cfg) == ckpts / "checkpoint-6"
    monkeypatch.setenv(LAUNCH_RESUME_ENV, str(ckpts))
    assert resume_point(cfg) is None
    (ckpts / "checkpoint-2").mkdir(parents=True)  # no manifest: does not verify
    monkeypatch.setenv(LAUNCH_RESUME_ENV, str(tmp_path / "other" / "checkpoints" / "checkpoint-6"))
    assert resume_point(cfg) is None and (ckpts / "checkpoint-2.invalid").exists()  # verified here instead


def test_tune_refuses_multi_process_trials(tmp_path, monkeypatch, capsys):
    from harness.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["tune", "backend=trl", "backend.num_processes=2", "train.micro_batch_size=32"]) == 2
    assert "backend.num_processes=2: a trial's pruner reads every training step in this process" in (
        capsys.readouterr().err)


# ------------------------------------------------------------------------------------- orphaned ranks


@pytest.mark.parametrize("stuck", [False, True])
def test_a_rank_ends_when_the_process_that_launched_it_is_gone(tmp_path, stuck):
    """A rank's watch on the launch's owner: the owner SIGKILLed (and not yet reaped: a zombie counts as gone), the
    rank, silent in a long wait, ends by SIGTERM; one whose SIGTERM cannot act (stuck in a collective: here
    ignored), and whose output pipe went with the owner, ends after the grace period."""
    owner = subprocess.Popen(["sleep", "600"])
    grace = 2 if stuck else 60  # SIGTERM ends a rank that is not stuck long before 60 s
    rank_code = (f"import signal, time\nimport harness.launch as L\nL.STOP_GRACE_S = {grace}\n"
                 f"L.stop_with_owner({owner.pid})\n"
                 + ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if stuck else "") + "time.sleep(600)\n")
    rank = subprocess.Popen([sys.executable, "-c", rank_code], cwd=REPO, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    assert rank.poll() is None  # the owner is alive: the rank goes on
    if stuck:
        rank.stderr.close()  # nothing reads the rank's output any more
    owner.send_signal(signal.SIGKILL)
    killed = time.time()
    rank.wait(timeout=30)
    took = time.time() - killed
    owner.wait()
    assert rank.returncode in (-signal.SIGTERM, 128 + signal.SIGTERM)
    if stuck:
        assert took >= grace  # ended by the exit after the grace period
    else:
        assert f"the launch's owner (pid {owner.pid}) is gone; stopping" in rank.stderr.read()


def test_a_rank_ends_when_its_agent_is_gone(tmp_path):
    """torch's agent (the rank's parent) SIGKILLed while the launch's owner lives on: the rank, reparented, ends too
    (the owner would otherwise wait on the output pipe the rank holds open)."""
    rank_code = (f"import time\nimport harness.launch as L\nL.STOP_GRACE_S = 60\nL.stop_with_owner({os.getpid()})\n"
                 "print('watching', flush=True)\ntime.sleep(600)\n")
    agent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time\n"
                              f"p = subprocess.Popen([sys.executable, '-c', {rank_code!r}], cwd={str(REPO)!r})\n"
                              "print(p.pid, flush=True)\ntime.sleep(600)\n"], stdout=subprocess.PIPE, text=True)
    rank_pid = int(agent.stdout.readline())
    assert agent.stdout.readline().strip() == "watching"
    agent.kill()
    agent.wait()
    deadline = time.time() + 30
    while time.time() < deadline and _alive(rank_pid):
        time.sleep(0.2)
    assert not _alive(rank_pid), "the rank outlived its agent"


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def test_the_launcher_stops_its_own_ranks_and_no_other_process(tmp_path, monkeypatch):
    """What the launch's owner does once its agent is gone: every process a ``rank-<r>.pid`` names that runs this
    launch's spec gets SIGTERM, then SIGKILL after the grace period; a pid the system gave to another process since
    is left alone."""
    import harness.launch as launch

    monkeypatch.setattr(launch, "STOP_GRACE_S", 1)
    work = tmp_path / "launch"
    work.mkdir()
    deaf = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    ours = [subprocess.Popen([sys.executable, "-c", code, "-m", "harness.launch", str(work / launch.SPEC_FILE)])
            for code in ("import time; time.sleep(600)", deaf)]
    other = subprocess.Popen([sys.executable, "-c", deaf, str(tmp_path / "elsewhere" / launch.SPEC_FILE)])
    for r, proc in enumerate([*ours, other]):
        (work / f"rank-{r}.pid").write_text(str(proc.pid))
    time.sleep(1.0)
    assert sorted(launch.rank_pids(work)) == sorted(p.pid for p in ours)
    launch.stop_ranks(work)
    assert [p.wait(timeout=10) for p in ours] == [-signal.SIGTERM, -signal.SIGKILL]
    assert other.poll() is None and launch.rank_pids(work) == []
    other.kill()
    other.wait()


# ------------------------------------------------------------------------------------- prompt-seeded rollouts


def test_prompt_seeded_rollouts_do_not_depend_on_the_batch_a_prompt_shares(cache_dir):
    """A prompt's completions depend on its seed only: sampled beside other prompts (another padding, another row
    order) or alone, with its seed they are the same; another seed gives others."""
    import torch

    from harness.backends.sampling import sample_completions
    from tests.test_native_trainer import _tiny_prompts

    model, tok, enc = _tiny_prompts(cache_dir, 3)
    kw = dict(num_generations=4, max_new_tokens=24, temperature=1.0, top_p=1.0, eos_token_id=tok.eos_token_id,
              pad_token_id=tok.pad_token_id)

    def rows_of(indices: list[int], seeds: list[int]) -> torch.Tensor:
        batch = tok([tok.decode(enc.input_ids[i][enc.attention_mask[i].bool()]) for i in indices],
                    return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            seqs, _, _ = sample_completions(model, batch.input_ids, batch.attention_mask, prompt_seeds=seeds, **kw)
        return seqs[:, batch.input_ids.shape[1]:]

    together = rows_of([0, 1, 2], [11, 22, 33])
    alone = rows_of([2], [33])
    swapped = rows_of([2, 0], [33, 11])
    assert torch.equal(together[8:], alone) and torch.equal(swapped[:4], alone) and torch.equal(swapped[4:],
                                                                                                 together[:4])
    assert not torch.equal(rows_of([2], [34]), alone)


@pytest.mark.parametrize("top_p", [1.0, 0.99])
def test_prompt_seeded_sampling_draws_the_tempered_distribution(cache_dir, top_p):
    """The inverse-CDF draw of the prompt-seeded sampler against the tempered (and nucleus-truncated) distribution of
    the first token: 4,000 draws, a chi-square test at 1e-3 (it fails about once in a thousand runs by chance with
    the right distribution; a wrong one, such as the untempered distribution, fails it every time)."""
    import torch
    from scipy.stats import chisquare

    from harness.backends.sampling import sample_completions
    from tests.test_native_trainer import _tiny_prompts

    model, tok, enc = _tiny_prompts(cache_dir, 1)
    n, temperature = 4000, 2.0
    with torch.no_grad():
        logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits[0, -1]
        seqs, _, _ = sample_completions(model, enc.input_ids, enc.attention_mask, num_generations=n, max_new_tokens=1,
                                        temperature=temperature, top_p=top_p, eos_token_id=tok.eos_token_id,
                                        pad_token_id=tok.pad_token_id, prompt_seeds=[7])
    probs = torch.softmax(logits.double() / temperature, -1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = order[(sorted_probs.cumsum(0) - sorted_probs) < top_p]
        probs = torch.zeros_like(probs).index_fill(0, keep, 1.0) * probs
        probs = probs / probs.sum()
    drawn = torch.bincount(seqs[:, -1], minlength=len(probs)).double()
    assert drawn[probs == 0].sum() == 0  # never a token outside the nucleus
    common = n * probs >= 5  # chi-square's validity: the rare tokens pooled into one cell
    assert int(common.sum()) >= 3, "the test needs a first token with several likely values"

    pooled = bool(probs[~common].sum() > 0)  # a nucleus may hold only likely tokens

    def cells(p: torch.Tensor) -> torch.Tensor:
        return torch.cat([p[common], p[~common].sum().reshape(1)][:2 if pooled else 1]).numpy()

    observed = cells(drawn)
    assert chisquare(observed, n * cells(probs)).pvalue > 1e-3
    untempered = torch.softmax(logits.double(), -1) * (probs > 0)
    assert chisquare(observed, n * cells(untempered / untempered.sum())).pvalue < 1e-3


def _synced_rank(rank: int, cache_dir: Path, port: int, out: Path) -> None:
    """One of two gloo processes: greedy (top_p → 0), rank 0 with an EOS that ends its rows at the first token,
    rank 1 with one that never comes; each samples unsynced, then synced, counting its model's forwards."""
    import torch

    from harness.backends.sampling import sample_completions
    from tests.test_native_trainer import _tiny_prompts

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model, tok, enc = _tiny_prompts(cache_dir, 1)  # one prompt: its greedy rows share their first token
    calls = [0]
    model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    kw = dict(num_generations=2, max_new_tokens=6, temperature=1.0, top_p=1e-6, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        greedy, _, _ = sample_completions(model, enc.input_ids, enc.attention_mask, eos_token_id=-1, **kw)
        width = enc.input_ids.shape[1]
        never = next(t for t in range(len(tok)) if t not in set(greedy[:, width:].flatten().tolist()))
        eos = int(greedy[0, width]) if rank == 0 else never
        results = {}
        for synced in (False, True):
            calls[0] = 0
            seqs, _, _ = sample_completions(model, enc.input_ids, enc.attention_mask, eos_token_id=eos,
                                            synced=synced, **kw)
            results[str(synced)] = {"forwards": calls[0], "seqs": seqs.tolist()}
    (out / f"rank-{rank}.json").write_text(json.dumps(results))
    torch.distributed.destroy_process_group()


def test_synced_sampling_keeps_a_finished_process_stepping_until_every_process_is_done(cache_dir, tmp_path):
    """A sharded model's every forward is a collective: with ``synced`` a process whose rows all ended keeps
    stepping the model as long as another decodes (here: 6 forwards on both, against 1 on its own), and still
    returns exactly what it returns unsynced."""
    import torch.multiprocessing as mp

    from harness.launch import free_port

    mp.start_processes(_synced_rank, args=(cache_dir, free_port(), tmp_path), nprocs=2, start_method="spawn")
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["False"]["forwards"] == 1 and ranks[1]["False"]["forwards"] == 6  # prefill + decode steps
    assert ranks[0]["True"]["forwards"] == ranks[1]["True"]["forwards"] == 6
    for r in ranks:
        assert r["True"]["seqs"] == r["False"]["seqs"]


# ------------------------------------------------------------------------------------- real processes (gloo)


def _harness(subcommand: str, args: list[str], cwd: Path, cache_dir: Path, **popen) -> subprocess.Popen:
    env = {**os.environ, "HARNESS_CACHE_DIR": str(cache_dir), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    exe = shutil.which("harness", path=str(Path(sys.executable).parent)) or "harness"
    return subprocess.Popen([exe, subcommand, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def _finish(proc: subprocess.Popen, timeout: int = 600) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _history(out_dir: Path) -> list[dict]:
    return json.loads((out_dir / "train_history.json").read_text())


@pytest.mark.slow
def test_two_processes_train_as_one_then_resume(tmp_path, cache_dir):
    """The same cell on 1 and on 2 gloo processes (same global batch, prompt-seeded rollouts, token-mean: the
    aggregation whose normaliser differs between processes) gives the same curve within float tolerance; the 2-process
    cell evaluates once and logs one MLflow run; run again with one more step, every rank resumes from its last
    checkpoint."""
    import mlflow

    common = [*TRL_TINY, "backend.sampler=prompt_seeded", "train.loss.agg=token-mean", "train.lr=1e-3",
              "train.steps=3", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "tracking.experiment=launch"]
    one = _harness("run", [*common, "eval.enabled=false", "tracking.enabled=false", f"output_dir={tmp_path / 'one'}"],
                   tmp_path, cache_dir)
    code, _, err = _finish(one)
    assert code == 0, err[-4000:]
    two_args = [*common, "backend.num_processes=2", "eval.bench.arith.limit=8", "eval.bench.arith.k=2",
                f"output_dir={tmp_path / 'two'}"]
    code, out, err = _finish(_harness("run", two_args, tmp_path, cache_dir))
    assert code == 0, err[-4000:]
    assert "2 processes: " in err and "accelerate.commands.launch" in err

    a, b = _history(tmp_path / "one"), _history(tmp_path / "two")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b, strict=True):
        assert x["reward"] == y["reward"] and x["response_length"] == y["response_length"]  # the same rollouts
        for key in ("loss", "grad_norm", "it2/abs_ratio_dev", "it2/eur", "it2/gate_weight"):
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), key
    assert any(abs(x["loss"]) > 1e-3 for x in a)  # the losses compared are not all zero

    launch = tmp_path / "two" / "launch"
    assert {p.name for p in launch.glob("rank-*.pid")} == {"rank-0.pid", "rank-1.pid"}
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["launch"], output_format="list")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # rank 0 alone logged
    assert "eval/arith/acc" in runs[0].data.metrics and json.loads(out)["mlflow_run_id"] == runs[0].info.run_id
    steps = mlflow.MlflowClient().get_metric_history(runs[0].info.run_id, "train/reward")
    assert sorted(m.step for m in steps) == [1, 2, 3]

    resumed = [*[a for a in two_args if not a.startswith("train.steps=")], "train.steps=4", "resume=true",
               "eval.enabled=false", "tracking.enabled=false"]
    code, _, err = _finish(_harness("run", resumed, tmp_path, cache_dir))
    assert code == 0, err[-4000:]
    spec = json.loads((launch / "spec.json").read_text())
    assert spec["resume_from"] == str(tmp_path / "two" / "checkpoints" / "checkpoint-6")  # 3 steps x 2 passes
    c = _history(tmp_path / "two")
    assert len(c) == 4 and [h["reward"] for h in c[:3]] == [h["reward"] for h in b]


@pytest.mark.slow
def test_a_killed_rank_fails_its_cell_the_sweep_goes_on_and_a_rerun_resumes_it(tmp_path, cache_dir):
    """A 2-cell x 2-process sweep: rank 1 of the first cell is killed after its first checkpoint. The cell fails
    within the collective timeout with the rank and signal as its reason (its MLflow run FAILED), the second cell
    finishes; the same sweep run again resumes the first cell from its checkpoint and skips the second."""
    from tests.test_sweep import _runs

    timeout_s = 60
    args = ["hydra.sweeper.gates=[sigmoid,clip]", "hydra.sweeper.taus=[2.0]", "hydra.sweeper.seeds=[0]",
            "hydra.sweeper.baseline=false", "hydra.sweeper.report=false", *TRL_TINY, "train.steps=4",
            "backend.num_processes=2", f"backend.collective_timeout_s={timeout_s}",
            "eval.enabled=false"]  # the 2-process evaluation is the test above's
    sweep = _harness("sweep", args, tmp_path, cache_dir)
    cells = tmp_path / "outputs" / "cells"
    killed_at, victim = None, None
    deadline = time.time() + 400
    while killed_at is None and time.time() < deadline and sweep.poll() is None:
        for cell in sorted(cells.glob("*")) if cells.exists() else []:
            pid = cell / "launch" / "rank-1.pid"
            if pid.exists() and list(cell.glob("checkpoints/checkpoint-*/manifest.json")):
                os.kill(int(pid.read_text()), signal.SIGKILL)
                killed_at, victim = time.time(), cell
                break
        time.sleep(0.2)
    assert killed_at is not None, "no rank to kill"
    code, out, err = _finish(sweep)
    assert code == 1, err[-4000:]
    assert "2 cells — 1 finished, 0 skipped, 1 failed" in out, out
    failed = next(line for line in out.splitlines() if line.strip().startswith("failed"))
    assert "rank 1 (local_rank: 1) exited with code -9 (SIGKILL)" in failed, failed
    runs = [r for r in _runs(tmp_path, "gates") if "config_hash" in r.data.tags]
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED"]  # the sweep went on
    victim_run = next(r for r in runs if r.info.status == "FAILED")
    assert "rank 1 (local_rank: 1) exited with code -9 (SIGKILL)" in victim_run.data.tags["failure_reason"]
    failed_after = victim_run.info.end_time / 1000 - killed_at
    print(f"the cell's run was marked FAILED {failed_after:.1f} s after the kill")
    assert failed_after < timeout_s  # no hang

    code, out, err = _finish(_harness("sweep", args, tmp_path, cache_dir))
    assert code == 0, err[-4000:]
    assert "2 cells — 1 finished, 1 skipped, 0 failed" in out, out
    spec = json.loads((victim / "launch" / "spec.json").read_text())
    assert spec["resume_from"] and (tmp_path / spec["resume_from"]).parent == victim / "checkpoints"
    assert len(_history(victim)) == 4
    finished = [r for r in _runs(tmp_path, "gates") if "config_hash" in r.data.tags and r.info.status == "FINISHED"]
    assert len(finished) == 2


def test_launch_keys_leave_a_one_process_cells_hash_as_it_was():
    """A cell keeps the config hash it had before the multi-process keys existed (its finished run is found); the
    launcher and the collective timeout never enter the hash (a timeout raised after a failure resumes the cell)."""
    from harness.cell import config_hash

    def chash(*extra: str) -> str:
        return config_hash(compose(["backend=trl", "output_dir=x", *extra]))

    assert chash() == chash("backend.accelerate_config=fsdp", "backend.collective_timeout_s=60")
    two = chash("backend.num_processes=2")
    assert two != chash() and two == chash("backend.num_processes=2", "backend.collective_timeout_s=60",
                                            "backend.launcher=torchrun")
