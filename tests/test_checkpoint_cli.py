"""Atomic checkpoints, the EMA, and the command line (in process, plus one subprocess smoke test)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from genalign.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, resolve_resume, save_checkpoint
from genalign.cli import main
from genalign.ema import EMA


def _write(payload):
    def write(tmp):
        with open(os.path.join(tmp, "state.json"), "w") as fh:
            json.dump(payload, fh)
    return write


def test_checkpoints_are_published_atomically_and_pruned(tmp_path):
    root = str(tmp_path / "ckpt")
    for step in (1, 2, 3):
        save_checkpoint(root, step, _write({"step": step}), keep_last=2)
    assert [os.path.basename(p) for p in list_checkpoints(root)] == ["checkpoint-2", "checkpoint-3"]
    assert latest_checkpoint(root).endswith("checkpoint-3")
    # a writer that dies leaves only a temporary directory: the previous checkpoint stays the latest
    with pytest.raises(RuntimeError):
        save_checkpoint(root, 4, lambda tmp: (_ for _ in ()).throw(RuntimeError("killed")), keep_last=2)
    assert latest_checkpoint(root).endswith("checkpoint-3")
    # a published directory that lost its marker is skipped with a warning, and 'latest' falls back
    os.remove(os.path.join(root, "checkpoint-3", "COMPLETE"))
    with pytest.warns(UserWarning, match="incomplete|partial"):
        assert latest_checkpoint(root).endswith("checkpoint-2")
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        resolve_resume(str(tmp_path), os.path.join(root, "checkpoint-3"))
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_resume(str(tmp_path / "elsewhere"), "latest")


def test_ema_follows_weights_with_warmup_and_swaps():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([p], decay=0.9, every=1)
    with torch.no_grad():
        p.fill_(1.0)
    ema.step(1)  # first update: d = min(0.9, 1/10) = 0.1
    torch.testing.assert_close(ema.shadow[0], torch.full((3,), 0.9))
    with ema.swapped_in():
        torch.testing.assert_close(p.detach(), torch.full((3,), 0.9))
    torch.testing.assert_close(p.detach(), torch.ones(3))
    state = ema.state_dict()
    other = EMA([torch.nn.Parameter(torch.zeros(3))], 0.9, 1)
    other.load_state_dict(state)
    torch.testing.assert_close(other.shadow[0], ema.shadow[0])


def test_cli_sample_writes_pngs_and_manifest(tmp_path):
    out = tmp_path / "samples"
    assert main(["sample", "--model", "digits", "--prompt", "the digit 3", "--prompt", "a handwritten seven",
                 "--num-per-prompt", "3", "--seed", "5", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in open(out / "manifest.jsonl")]
    assert len(rows) == 6 and rows[0] == {"file": "00000.png", "prompt": "the digit 3", "seed": 5}
    assert rows[-1]["seed"] == 10 and all((out / r["file"]).is_file() for r in rows)
    # image i depends only on its own seed
    again = tmp_path / "again"
    main(["sample", "--model", "digits", "--prompt", "a handwritten seven", "--num-per-prompt", "1", "--seed", "8",
          "--out", str(again)])
    assert (again / "00000.png").read_bytes() == (out / "00003.png").read_bytes()


def test_cli_reports_config_errors_and_unavailable_commands(tmp_path, capsys):
    assert main(["train", "configs/digits_flow_grpo.yaml", "train.lrr=1"]) == 2
    assert "did you mean 'train.lr'" in capsys.readouterr().err
    assert main(["sample", "--prompt", "the digit 3", "--rlg", "1", "--out", str(tmp_path / "s")]) == 2
    assert "--rlg needs --lora" in capsys.readouterr().err


def test_console_script_help_runs():
    out = subprocess.run([sys.executable, "-m", "genalign.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "train" in out.stdout and "sample" in out.stdout


def test_module_cli_runs_from_the_checkout_and_elsewhere(tmp_path):
    """With the package installed (``pip install -e .``), ``python -m genalign.cli`` works in the repository root
    (where ./genalign shadows nothing: it is the installed code) and in any other directory, and
    genalign.pipelines / rewards / assets are the checkout's top-level folders, with no search-path edit."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = ("import genalign, genalign.pipelines, genalign.rewards, genalign.assets; "
            "print(len(genalign.__path__), genalign.pipelines.__file__)")
    for cwd in (root, tmp_path):
        out = subprocess.run([sys.executable, "-m", "genalign.cli", "--help"], cwd=cwd, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0 and "pretrain-digits" in out.stdout, out.stderr
        out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["1", str(root / "pipelines" / "__init__.py")]
