"""Run directories: a used output_dir is refused or overwritten (never mixed), checkpoints belong to one run,
periodic (epoch and time) checkpoints by default, the EMA export rule, trackers, and one-line CLI errors."""

import json
import os
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from genalign.checkpoint import CheckpointError, Checkpointer, latest_checkpoint, list_checkpoints
from genalign.cli import main
from genalign.config import CheckpointConfig, ConfigError, load_config
from genalign.lora import lora_state_dict
from genalign.run import RunDirError, read_run_id
from genalign.trainer import Trainer

from .test_trainer import REWARDS, prompts_file, sd3_dir, tiny_overrides  # noqa: F401 (fixtures)


def trainer(sd3_dir, out, prompts_file, resume=None, overwrite=False, accelerator=None, **kw):
    cfg = load_config(None, tiny_overrides(sd3_dir, out, prompts_file, **kw))
    return Trainer(cfg, resume=resume, overwrite=overwrite, accelerator=accelerator)


def epochs_logged(run):
    return [json.loads(line)["epoch"] for line in open(run / "metrics.jsonl")]


def lora_file(path):
    return load_file(os.path.join(path, "adapter_model.safetensors"))


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------- 1. one run per directory

def test_used_output_dir_is_refused_and_overwrite_starts_a_clean_run(sd3_dir, tmp_path, prompts_file):
    run = tmp_path / "run"
    old = {"num_epochs": 3, "checkpoint.every": 1, "checkpoint.keep_last": 3}
    trainer(sd3_dir, run, prompts_file, **old).train()
    old_id = read_run_id(str(run))
    assert epochs_logged(run) == [1, 2, 3] and len(list_checkpoints(str(run / "checkpoints"))) == 3
    # a new run into the used directory without --resume is refused, naming both ways out; nothing is touched
    with pytest.raises(RunDirError, match=r"--resume latest.*--overwrite"):
        trainer(sd3_dir, run, prompts_file, num_epochs=1)
    assert epochs_logged(run) == [1, 2, 3]
    with pytest.raises(ConfigError, match="exclude each other"):
        trainer(sd3_dir, run, prompts_file, resume="latest", overwrite=True)
    # --overwrite: the previous run's metrics, checkpoints and final weights are gone before the new run writes
    new = trainer(sd3_dir, run, prompts_file, overwrite=True, num_epochs=1, **{"checkpoint.every": 1,
                                                                               "checkpoint.keep_last": 1})
    new.train()
    assert epochs_logged(run) == [1]
    ckpts = list_checkpoints(str(run / "checkpoints"))
    assert [os.path.basename(p) for p in ckpts] == ["checkpoint-1"]  # keep_last kept the NEW run's checkpoint
    assert latest_checkpoint(str(run / "checkpoints")) == ckpts[0]
    new_id = read_run_id(str(run))
    assert new_id != old_id and Checkpointer.run_id_of(ckpts[0]) == new_id
    assert same(lora_file(run / "final" / "lora"), lora_state_dict(new.denoiser))
    # and the new run resumes normally
    resumed = trainer(sd3_dir, run, prompts_file, resume="latest", num_epochs=2)
    assert (resumed.epoch, resumed.run_id) == (1, new_id)


def test_resume_refuses_a_checkpoint_of_another_run(sd3_dir, tmp_path, prompts_file):
    trainer(sd3_dir, tmp_path / "a", prompts_file).train()
    trainer(sd3_dir, tmp_path / "b", prompts_file).train()
    other = latest_checkpoint(str(tmp_path / "a" / "checkpoints"))
    with pytest.raises(CheckpointError, match="belongs to run"):
        trainer(sd3_dir, tmp_path / "b", prompts_file, resume=other, num_epochs=2)


# ---------------------------------------------------------------------- 2. periodic checkpoints

def test_checkpoints_are_periodic_by_default():
    c = CheckpointConfig()
    assert c.every == 10 and c.every_minutes == 30.0


@pytest.mark.parametrize("minutes,steps", [(1e-9, [1, 2, 3]), (0, [3])])
def test_time_based_checkpoints(sd3_dir, tmp_path, prompts_file, minutes, steps):
    run = tmp_path / "run"
    trainer(sd3_dir, run, prompts_file, num_epochs=3, **{"checkpoint.every": 0, "checkpoint.every_minutes": minutes,
                                                          "checkpoint.keep_last": 5}).train()
    assert [int(p.rsplit("-", 1)[1]) for p in list_checkpoints(str(run / "checkpoints"))] == steps


# ---------------------------------------------------------------------- 3. EMA export

@pytest.mark.parametrize("ema_every", [8, 1])
def test_final_lora_is_the_trained_weights_and_lora_ema_only_when_updated(sd3_dir, tmp_path, prompts_file, ema_every):
    run = tmp_path / "run"
    tr = trainer(sd3_dir, run, prompts_file, **{"train.ema_every": ema_every})  # one optimizer step
    initial = lora_state_dict(tr.denoiser)
    initial = {k: v.detach().float().cpu().clone() for k, v in initial.items()}
    tr.train()
    final = lora_file(run / "final" / "lora")
    assert same(final, {k: v.detach().float().cpu() for k, v in lora_state_dict(tr.denoiser).items()})
    assert not same(final, initial)  # loading final/lora changes the model
    assert not (run / "final" / "lora_raw").exists()
    if ema_every == 8:  # the EMA never moved: no lora_ema
        assert not (run / "final" / "lora_ema").exists()
    else:
        ema = lora_file(run / "final" / "lora_ema")
        assert not same(ema, final) and not same(ema, initial)


# ---------------------------------------------------------------------- 4. trackers

def test_missing_or_unknown_tracker_is_an_error_naming_the_package(sd3_dir, tmp_path, prompts_file, monkeypatch):
    import genalign.run

    monkeypatch.setattr(genalign.run, "tracker_available", lambda name: False)
    with pytest.raises(ConfigError, match=r"'tensorboard'.*pip install tensorboard"):
        trainer(sd3_dir, tmp_path / "run", prompts_file, log_with="[tensorboard]")
    with pytest.raises(ConfigError, match=r"unknown tracker 'tensorbord'"):
        trainer(sd3_dir, tmp_path / "run", prompts_file, log_with="[tensorbord]")
    assert main(["train", f"model.id={sd3_dir}", f"output_dir={tmp_path / 'cli'}", "log_with=[wandb]"]) == 2


def test_eval_images_and_before_after_grid_go_to_image_trackers(sd3_dir, tmp_path, prompts_file):
    from accelerate import Accelerator
    from accelerate.tracking import GeneralTracker

    class Recorder(GeneralTracker):
        name, requires_logging_directory, main_process_only = "recorder", False, True

        def __init__(self):
            super().__init__()
            self.images = []

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            pass

        def log(self, values, step=None, **kwargs):
            pass

        def log_images(self, values, step=None, **kwargs):
            self.images += [(k, len(v), v[0].shape, step) for k, v in values.items()]

    rec = Recorder()
    acc = Accelerator(cpu=True, log_with=[rec])
    run = tmp_path / "run"
    tr = trainer(sd3_dir, run, prompts_file, accelerator=acc, **{"eval_prompts_file": prompts_file,
                                                                "eval.num_per_prompt": 2})
    tr.train()
    names = [(k, n, step) for k, n, _, step in rec.images]
    assert ("eval/images", 6, 0) in names and ("eval/images", 6, 1) in names and ("before_after", 1, 1) in names
    assert all(shape[-1] == 3 for _, _, shape, _ in rec.images)  # HWC uint8 for non-tensorboard trackers
    assert (run / "before_after.png").is_file()


def test_shown_eval_images_are_gathered_from_every_process():
    """The before/after grid works with several processes: each process's share is summed into zeros."""
    from genalign.run import shown_indices

    n, per = 6, 2  # 3 prompts x 2 images, shared by 2 processes (i % 2 == rank)
    everything = torch.rand(n, 3, 4, 4)
    wanted = shown_indices(n, per)
    parts = {}

    class Acc:
        device = "cpu"

        def __init__(self, rank):
            self.rank = rank

        def reduce(self, t, op):
            return parts[0] + parts[1]

    for rank in (0, 1):
        mine = list(range(rank, n, 2))
        me = types.SimpleNamespace(evaluator=types.SimpleNamespace(num_images=n), cfg=load_config(None, [
            "eval.num_per_prompt=2"]), world=1, acc=Acc(rank))
        parts[rank] = Trainer._shown_eval_images(me, everything[mine], mine)
    me.world = 2
    got = Trainer._shown_eval_images(me, everything[list(range(1, n, 2))], list(range(1, n, 2)))
    assert torch.equal(got, everything[wanted])


def test_rank_above_zero_prints_nothing(monkeypatch, capsys, tmp_path):
    import genalign.trainer

    class Stub:
        def __init__(self, cfg, resume=None, overwrite=False):
            self.is_main = False

        def train(self):
            return {}

    monkeypatch.setattr(genalign.trainer, "Trainer", Stub)
    assert main(["train", f"output_dir={tmp_path / 'run'}"]) == 0
    assert capsys.readouterr().out == ""


# ---------------------------------------------------------------------- 5. one-line CLI errors

def one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    line = [ln for ln in err.splitlines() if ln.startswith("genalign train: error:")]
    assert len(line) == 1, err
    for needle in needles:
        assert needle in line[0], line[0]


def test_known_errors_are_one_line_and_debug_shows_the_traceback(sd3_dir, tmp_path, prompts_file, capsys):
    args = tiny_overrides(sd3_dir, tmp_path / "run", prompts_file)
    assert main(["train", *args, f"model.id={tmp_path / 'nope'}"]) == 2
    one_line_error(capsys, "model directory", "does not exist")
    assert main(["train", *args, f"reward={REWARDS}:brightnes"]) == 2
    one_line_error(capsys, "has no 'brightnes'", "brightness")
    assert main(["train", *args, "--resume", "latest"]) == 1
    one_line_error(capsys, "no complete checkpoint")
    assert main(["train", *args, "train.lr=fast"]) == 2
    one_line_error(capsys, "train.lr")
    assert main(["train", *args, f"reward={REWARDS}:raises"]) == 1
    one_line_error(capsys, "reward server unreachable")
    # the failed reward left only failed_rewards/ (no metrics): the directory is not a used run directory
    with pytest.raises(CheckpointError):
        main(["--debug", "train", *args, "--resume", "latest"])


def test_used_directory_and_nan_guard_are_one_line(sd3_dir, tmp_path, prompts_file, capsys, monkeypatch):
    from genalign.optim import NonFiniteError

    args = tiny_overrides(sd3_dir, tmp_path / "run", prompts_file)
    assert main(["train", *args]) == 0
    capsys.readouterr()
    assert main(["train", *args]) == 2
    one_line_error(capsys, "--resume latest", "--overwrite")

    def nan(self):
        raise NonFiniteError("non-finite loss at epoch 1; resume from ... with --resume latest")

    monkeypatch.setattr(Trainer, "train", nan)
    assert main(["train", *args, "--overwrite"]) == 1
    one_line_error(capsys, "non-finite loss")
    assert not Path(tmp_path / "run" / "metrics.jsonl").exists()  # --overwrite cleared the previous run


def test_two_process_run_writes_the_before_after_grid_and_prints_one_summary(sd3_dir, tmp_path, prompts_file):
    """``torchrun --nproc_per_node 2 -m genalign.cli train`` (gloo): the before/after grid holds every shown
    eval image (3 prompts, shared 2 + 1), and only the main process prints the summary (no stray ``{}``)."""
    import sys

    from .test_distributed import _free_port, _overrides, _run

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2", "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), "-m", "genalign.cli", "train",
           *_overrides(sd3_dir, run, prompts_file, eval_prompts_file=prompts_file)]
    done = _run(cmd, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (run / "before_after.png").is_file()
    assert load_file(str(run / "before_images.safetensors"))["images"].shape[0] == 3
    assert "{}" not in done.stdout and done.stdout.count('"epoch"') == 1, done.stdout
