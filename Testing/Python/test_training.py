"""Headless training: configs, smoke pretrain -> adapt -> evaluate, resume after a kill, DDP on gloo.

Tiny everything: 32^3 phantom label maps (nested ellipsoids with FreeSurfer labels), 24^3 crops,
a U-Net with f_maps 8 and 3 levels, a few steps.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import BrainIDLib as bid
from BrainIDLib.model import Architecture, BrainIDModel
from BrainIDLib.weights import save_model
from training.cli import main
from training.config import CONFIG_DIR, ConfigError, load_config
from training.engine import read_log, train

REPO = Path(__file__).resolve().parents[2]


def phantom(shape=(32, 32, 32), seed=0) -> np.ndarray:
    """Nested ellipsoids: cortex around white matter around ventricles, CSF outside, split left/right
    along axis 0, with FreeSurfer ids (slightly different radii per seed)."""
    rng = np.random.default_rng(seed)
    axes = [np.linspace(-1, 1, n) for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    s = rng.uniform(0.9, 1.1, 3)
    r = (x / (0.85 * s[0])) ** 2 + (y / (0.8 * s[1])) ** 2 + (z / (0.7 * s[2])) ** 2
    left = x < 0
    lab = np.zeros(shape, np.int16)
    lab[r < 1.0] = 24
    lab[r < 0.8] = np.where(left, 3, 42)[r < 0.8]
    lab[r < 0.5] = np.where(left, 2, 41)[r < 0.5]
    lab[r < 0.12] = np.where(left, 4, 43)[r < 0.12]
    deep = (r < 0.3) & (np.abs(y) < 0.2) & (z < 0)
    lab[deep] = np.where(left, 10, 49)[deep]  # thalami
    return lab


@pytest.fixture(scope="module")
def label_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("labels")
    for i in range(3):
        nib.save(nib.Nifti1Image(phantom(seed=i), np.eye(4)), str(d / f"subject{i}.nii.gz"))
    return d


def smoke(label_dir, run_dir, *extra):
    return ["--config", "smoke", "--set", f"data.labels={label_dir}", "--set", f"run.dir={run_dir}", *extra]


def _run(cmd, timeout=300) -> subprocess.CompletedProcess:
    """Run a command in its own session; on timeout kill the whole group (torchrun's workers too)."""
    proc = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd[:6])}... timed out:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _env():
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    return env


# --- configs --------------------------------------------------------------------------------

def test_shipped_configs_load():
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    for required in ("pretrain_brainid", "pretrain_lite_cpu", "smoke", "adapt_segmentation", "adapt_anatomy",
                     "adapt_super_resolution", "adapt_bias_field"):
        assert required in names
    from training.fewshot import fewshot_config

    for name in names:
        if fewshot_config(name) is not None:  # few-shot head configs run training/fewshot.py, not the engine
            continue
        load_config(name)
    official = load_config("pretrain_brainid")
    assert (official.model.f_maps, official.model.levels) == (64, 5)
    assert official.data.size == [128, 128, 128] and (official.data.mild, official.data.severe) == (2, 2)
    assert official.optim.lr == 1e-4 and official.optim.weight_decay == 0.0 and official.optim.schedule == "multistep"


def test_overrides_and_clear_errors(capsys):
    cfg = load_config("smoke", ["optim.lr=3e-4", "data.size=[16,20,24]", "adapt.tasks=[anatomy, bias_field]"])
    assert cfg.optim.lr == 3e-4 and cfg.data.size == [16, 20, 24] and cfg.adapt.tasks == ["anatomy", "bias_field"]
    # a key inside a free-form section replaces only that key (it used to drop the preset)
    gen = load_config("brainid_lite_2mm", ["data.generator.nonlin_std_max=2.0"]).data.generator
    assert gen["nonlin_std_max"] == 2.0 and gen["preset"] == "brainid-extended" and "resolution_probs" in gen
    with pytest.raises(ConfigError, match="unknown config key 'optim.learning_rate'"):
        load_config("smoke", ["optim.learning_rate=1"])
    with pytest.raises(ConfigError, match="run.max_steps' must be > 0"):
        load_config("smoke", ["run.max_steps=0"])
    with pytest.raises(ConfigError, match="run.amp' must be one of"):
        load_config("smoke", ["run.amp=fp8"])
    with pytest.raises(ConfigError, match="optim.lr' must be a float"):
        load_config("smoke", ["optim.lr=fast"])
    with pytest.raises(ConfigError, match="adapt.tasks"):
        load_config("smoke", ["adapt.tasks=[segmentation, colour]"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("no_such_config")
    assert main(["pretrain", "--config", "smoke", "--set", "data.size=4"]) == 2
    assert "data.size" in capsys.readouterr().err


# --- end to end -----------------------------------------------------------------------------

@pytest.mark.slow
def test_smoke_pretrain_adapt_evaluate(label_dir, tmp_path):
    pre, ada = tmp_path / "pre", tmp_path / "adapt"
    assert main(["pretrain", *smoke(label_dir, pre, "--set", "run.max_steps=3")]) == 0
    model_file = pre / "model.safetensors"
    assert model_file.is_file()
    record = json.loads((pre / "config.json").read_text())
    assert record["versions"]["torch"] == torch.__version__ and record["config"]["model"]["f_maps"] == 8
    assert len(read_log(pre)) == 3 and list((pre / "tensorboard").iterdir())
    # the pretraining loop refuses to overwrite a run
    assert main(["pretrain", *smoke(label_dir, pre)]) == 1

    assert main(["adapt", *smoke(label_dir, ada, "--set", "run.max_steps=3", "--set", f"model.init={model_file}",
                                 "--set", "adapt.tasks=[segmentation, bias_field]")]) == 0
    head = ada / "segmentation_head.safetensors"
    model = bid.load_model(model_file, heads={"segmentation": head, "bias_field": ada / "bias_field_head.safetensors"})
    assert model.heads["segmentation"].out_channels == 33
    assert model.metadata["heads"]["segmentation"]["labels"][:3] == [0, 14, 15]
    entries = json.loads((ada / "models_json_entries.json").read_text())
    assert {e["task"] for e in entries} == {"segmentation", "bias_field"} and all(len(e["sha256"]) == 64 for e in entries)
    # frozen backbone: the checkpoint holds only the heads
    ckpt = torch.load(ada / "checkpoints" / "last.pt", weights_only=True)
    assert all(k.startswith("heads.") for k in ckpt["net"])

    assert main(["evaluate", "--run", str(ada), "--set", "evaluate.regimes=[1mm, low_iso]"]) == 0
    report = json.loads((ada / "evaluation" / "evaluation.json").read_text())
    assert report["families"] == ["t1", "t2", "flair", "ct", "gmm"]
    assert set(report["summary"]["ct"]) == {"1mm", "low_iso", "all"}
    assert 0 <= report["summary"]["all"]["all"]["dice_mean"] <= 1
    assert report["summary"]["all"]["all"]["bias_field_nl2"] >= 0
    assert -1 <= report["features"]["consistency"] <= 1 and "distinctiveness" in report["features"]
    for png in ("training_curves.png", "dice_per_structure.png", "examples.png"):
        assert (ada / "evaluation" / png).stat().st_size > 1000
    assert "| gmm | low_iso |" in (ada / "evaluation" / "evaluation.md").read_text()


def _write_real_subject(d: Path, seed: int) -> dict:
    lab = phantom((28, 30, 26), seed)
    rng = np.random.default_rng(seed)
    means = {0: 0, 24: 30, 3: 80, 42: 80, 2: 120, 41: 120, 4: 30, 43: 30, 10: 100, 49: 100}
    img = np.vectorize(means.get)(lab).astype(np.float32) + rng.normal(0, 3, lab.shape).astype(np.float32)
    paths = {}
    for key, arr in (("image", img), ("labels", lab), ("t1", img)):
        p = d / f"s{seed}_{key}.nii.gz"
        nib.save(nib.Nifti1Image(arr, np.eye(4)), str(p))
        paths[key] = str(p)
    return paths


def test_adapt_on_real_nifti(tmp_path):
    model = BrainIDModel(Architecture(f_maps=8, levels=3, num_groups=4), heads={"anatomy": 1})
    init = save_model(model, tmp_path / "init.safetensors")
    manifest = tmp_path / "subjects.json"
    manifest.write_text(json.dumps([_write_real_subject(tmp_path, i) for i in range(2)]))
    run = tmp_path / "run"
    cfg = load_config("smoke", [f"run.dir={run}", "run.max_steps=2", f"model.init={init}", "data.source=nifti",
                                f"data.subjects={manifest}", "adapt.tasks=[segmentation, anatomy, super_resolution, bias_field]",
                                "adapt.low_memory_features=true"])
    from training.adapt import make_job

    summary = train(cfg, "adapt", make_job)
    assert summary["step"] == 2 and not summary["interrupted"]
    assert json.loads((run / "config.json").read_text())["low_memory_features"] is True
    log = read_log(run)
    assert {"seg_ce", "anat_l1", "sr_l1", "bias_l2"} <= set(log[-1])
    loaded = bid.load_model(init, heads={t: run / f"{t}_head.safetensors" for t in ("segmentation", "super_resolution")})
    assert loaded.heads["super_resolution"].conv.in_channels == 9  # features + image
    # the frozen backbone was not touched
    assert torch.equal(loaded.backbone.state_dict()["encoders.0.basic_module.SingleConv1.conv.weight"],
                       model.backbone.state_dict()["encoders.0.basic_module.SingleConv1.conv.weight"])

    # evaluation on the real images, each resolution regime simulated from the 1 mm image
    from training.evaluate import evaluate

    loaded = bid.load_model(init, heads={t: run / f"{t}_head.safetensors"
                                         for t in ("segmentation", "anatomy", "super_resolution", "bias_field")})
    eval_cfg = load_config(None, ["evaluate.regimes=[1mm, thick_slice]"], base=cfg)
    report = evaluate(eval_cfg, loaded, tmp_path / "eval", run)
    assert report["families"] == ["real"] and len(report["conditions"]) == 4
    row = report["summary"]["real"]["thick_slice"]
    assert 0 <= row["dice_mean"] <= 1 and row["anatomy_psnr"] > 0 and row["bias_field_nl2"] >= 0
    assert 0 <= row["anatomy_ms_ssim"] <= 1 and 0 <= row["super_resolution_ms_ssim"] <= 1
    assert report["features"]["consistency"] > 0.5  # same anatomy, two regimes
    assert (tmp_path / "eval" / "evaluation.md").is_file()

    # a brain-fitted anatomy head is scored as predict gives it: faded where the segmentation is sure of background
    with torch.no_grad():
        loaded.heads["anatomy"].conv.weight.zero_()
        loaded.heads["anatomy"].conv.bias.fill_(1.0)  # 1 everywhere, as a brain fit paints the air
    l1 = {}
    for case, background_bias in (("as is", None), ("brain sure", -100.0), ("background sure", 100.0)):
        loaded.metadata.setdefault("heads", {})["anatomy"] = {"brain_fade": 0.25} if background_bias else {}
        if background_bias:
            with torch.no_grad():
                loaded.heads["segmentation"].conv.weight.zero_()
                loaded.heads["segmentation"].conv.bias.fill_(0.0)[0] = background_bias
        rep = evaluate(eval_cfg, loaded, tmp_path / "eval", run)
        l1[case] = rep["summary"]["real"]["1mm"]["anatomy_l1"]
    assert l1["brain sure"] == pytest.approx(l1["as is"]) and l1["background sure"] != pytest.approx(l1["as is"])


# --- never lose work ------------------------------------------------------------------------

RESUME_ARGS = ["--set", "run.max_steps=7", "--set", "optim.schedule=constant", "--set", "optim.ema=0.8",
               "--set", "loss.contrastive=0.1", "--set", "loss.contrastive_voxels=32", "--set", "loss.segmentation=0.5",
               "--set", "run.checkpoint_every=100", "--set", "run.threads=2"]  # same threads in every process


def _final_weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "model.safetensors"))


@pytest.mark.slow
def test_killed_run_resumes_exactly(label_dir, tmp_path):
    ref, stopped, killed = tmp_path / "ref", tmp_path / "stopped", tmp_path / "killed"
    assert main(["pretrain", *smoke(label_dir, ref, *RESUME_ARGS)]) == 0
    ref_losses = [r["loss"] for r in read_log(ref)]
    assert len(ref_losses) == 7

    # 1. a planned stop (the same path as a signal): checkpoint, exit, resume
    assert main(["pretrain", *smoke(label_dir, stopped, *RESUME_ARGS, "--set", "run.stop_at_step=3")]) == 0
    assert torch.load(stopped / "checkpoints" / "last.pt", weights_only=True)["step"] == 3
    assert not (stopped / "model.safetensors").exists()
    assert main(["pretrain", "--resume", str(stopped)]) == 0  # (stop_at_step only stops at that very step)

    # 2. SIGTERM to a real process mid-run, then resume in another process
    cmd = [sys.executable, "-m", "training.cli", "pretrain", *smoke(label_dir, killed, *RESUME_ARGS)]
    cmd[cmd.index("run.max_steps=7")] = "run.max_steps=1000"
    proc = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(read_log(killed)) < 2 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 143, err
    step = torch.load(killed / "checkpoints" / "last.pt", weights_only=True)["step"]
    assert 2 <= step < 7, err
    done = _run([sys.executable, "-m", "training.cli", "pretrain", "--resume", str(killed), "--set", "run.max_steps=7"])
    assert done.returncode == 0, done.stderr

    ref_w = _final_weights(ref)
    for run in (stopped, killed):
        losses = [r["loss"] for r in read_log(run)]
        assert [r["step"] for r in read_log(run)] == list(range(1, 8))
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-4, atol=1e-6)
        for k, v in _final_weights(run).items():
            torch.testing.assert_close(v, ref_w[k], rtol=1e-4, atol=1e-5)


def test_resume_takes_a_new_lr_and_schedule(label_dir, tmp_path):
    """A resumed run follows --set optim.lr / optim.schedule (the scheduler state carries the old base lr)."""
    run = tmp_path / "lr"
    first = ["--set", "run.max_steps=4", "--set", "run.stop_at_step=2", "--set", "optim.schedule=cosine",
             "--set", "optim.lr=1e-3", "--set", "optim.warmup_steps=0"]
    assert main(["pretrain", *smoke(label_dir, run, *first)]) == 0
    assert main(["pretrain", "--resume", str(run), "--set", "optim.lr=2e-4", "--set", "optim.schedule=constant"]) == 0
    lrs = [r["lr"] for r in read_log(run)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[1] < 1e-3  # cosine before the stop
    assert lrs[2:] == pytest.approx([2e-4, 2e-4])


def test_resume_into_a_cooldown_with_a_new_ema(label_dir, tmp_path):
    """A constant-lr run branched into a warmup-stable-decay cooldown: the lr falls linearly over the last
    optim.cooldown_steps, and a new optim.ema on --resume replaces the checkpoint's decay."""
    run = tmp_path / "cool"
    first = ["--set", "run.max_steps=100", "--set", "run.stop_at_step=2", "--set", "optim.schedule=constant",
             "--set", "optim.lr=1e-3", "--set", "optim.warmup_steps=0", "--set", "optim.ema=0.999"]
    assert main(["pretrain", *smoke(label_dir, run, *first)]) == 0
    assert main(["pretrain", "--resume", str(run), "--set", "run.max_steps=6", "--set", "optim.cooldown_steps=4",
                 "--set", "optim.ema=0.5"]) == 0
    assert [r["lr"] for r in read_log(run)] == pytest.approx([1e-3, 1e-3, 1e-3, 7.5e-4, 5e-4, 2.5e-4])
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["ema"]["decay"] == 0.5


def test_ema_resumed_from_a_cpu_checkpoint_follows_the_module_device():
    """Checkpoints load on the CPU; on a GPU run the averages must go back to the GPU, or the first
    update mixes devices (seen on the first lent H200). 'meta' stands in for the GPU here."""
    from training.engine import EMA

    saved = EMA(torch.nn.Linear(3, 2), 0.9).state_dict()
    net = torch.nn.Linear(3, 2, device="meta")
    ema = EMA(net, 0.99)
    ema.load_state_dict(saved)
    assert {v.device.type for v in ema.shadow.values()} == {"meta"}
    ema.update(net)  # raised "Expected all tensors to be on the same device" before
    assert ema.decay == 0.9


def test_distributed_setup_on_cuda_names_the_local_gpu(monkeypatch):
    """The CUDA branch of setup ran on no machine of ours until a GPU was lent, where it failed at once
    (a function-level 'import torch._dynamo' made 'torch' local). The device calls are faked here."""
    from training import distributed

    monkeypatch.setattr(distributed, "select_device", lambda pref: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = distributed.setup("cuda")
    assert info.device == torch.device("cuda", 1) and chosen == [info.device] and not info.enabled


# --- multi-process --------------------------------------------------------------------------

@pytest.mark.slow
def test_ddp_gloo_two_processes(label_dir, tmp_path):
    run = tmp_path / "ddp"
    # --standalone: torchrun picks a free rendezvous port itself (no pick-then-bind race with other tests)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "-m", "training.cli", "pretrain"]
    # stop after 2 steps (rank 0 checkpoints, rank 1 keeps its RNG state beside), then resume on 2 ranks
    done = _run(launch + smoke(label_dir, run, "--set", "run.max_steps=3", "--set", "run.stop_at_step=2"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run / "checkpoints" / "rng_rank1.pt").is_file() and not (run / "summary.json").exists()
    # the resume goes through a probe that runs the same CLI, then lists the rank's native threads
    probe = launch[:-3] + [str(Path(__file__).with_name("ddp_exit_probe.py")), "pretrain"]
    done = _run(probe + ["--resume", str(run)])
    assert done.returncode == 0, done.stderr[-3000:]
    if Path("/proc/self/task").is_dir():  # where the probe can list native threads (Linux)
        threads = [ln for ln in done.stdout.splitlines() if "threads after training" in ln]
        assert len(threads) == 2 and not any("gloo" in ln for ln in threads), threads  # teardown joined them
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == 3
    assert summary["max_rank_difference"] == 0.0  # both ranks hold identical weights
    assert json.loads((run / "config.json").read_text())["world_size"] == 2
    assert len(read_log(run)) == 3  # rank 0 alone writes the log
    assert bid.load_model(run / "model.safetensors").arch.f_maps == 8


def test_synth_preview_is_wired(label_dir, tmp_path):
    out = tmp_path / "preview.png"
    assert main(["synth-preview", "--labels", str(label_dir), "--out", str(out), "--size", "24", "--seed", "1"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 1000
    positional = tmp_path / "positional.png"
    assert main(["synth-preview", str(label_dir / "subject0.nii.gz"), str(positional), "--size", "24"]) == 0
    assert positional.stat().st_size > 1000
    assert main(["synth-preview", "--labels", str(label_dir)]) != 0  # no output named: a clear error
