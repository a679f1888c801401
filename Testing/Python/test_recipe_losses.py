"""The training recipe against the official code: loss scales term by term (hand-computed values),
the curriculum acting through the data pipeline, and the whole-head generator options."""

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from BrainIDLib.normalize import ROBUST, normalise_tensor
from BrainIDLib.synth import SubjectGenerator
from training import losses
from training.config import load_config
from training.data import GeneratorSteps

from test_training import phantom


def official_gradient_loss(pred, target):
    """The official GradientLoss('l1').forward, transcribed: pad, forward difference, last one 0,
    L1 mean per axis over the padded volume, summed."""
    def grad(x):
        back = F.pad(x, [0, 1, 0, 0, 0, 0])[:, :, :, :, 1:]
        right = F.pad(x, [0, 0, 0, 1, 0, 0])[:, :, :, 1:, :]
        bottom = F.pad(x, [0, 0, 0, 0, 0, 1])[:, :, 1:, :, :]
        dx, dy, dz = back - x, right - x, bottom - x
        dx[:, :, :, :, -1] = 0
        dy[:, :, :, -1] = 0
        dz[:, :, -1] = 0
        return dx, dy, dz

    return sum(torch.mean((a - b).abs()) for a, b in zip(grad(pred), grad(target)))


def test_gradient_loss_is_the_official_sum_over_axes():
    pred = torch.zeros(1, 1, 2, 2, 2)
    pred[0, 0, 0, 0, 0] = 1.0
    # by hand: along each axis one of the 8 padded differences is 1 -> 1/8 per axis, 3/8 summed
    assert float(losses.gradient_l1(pred, torch.zeros_like(pred))) == pytest.approx(0.375)
    g = torch.Generator().manual_seed(0)
    p, t = torch.rand(2, 1, 9, 10, 11, generator=g), torch.rand(1, 1, 9, 10, 11, generator=g)
    assert float(losses.gradient_l1(p, t)) == pytest.approx(float(official_gradient_loss(p, t.expand_as(p))), rel=1e-5)
    total, parts = losses.anatomy_loss(p, t)
    assert float(total) == pytest.approx(float((p - t).abs().mean() + official_gradient_loss(p, t.expand_as(p))), rel=1e-5)


def test_segmentation_loss_is_the_official_criterion_by_default():
    logits = torch.zeros(1, 2, 1, 1, 2)  # p = 0.5 for both classes at both voxels
    target = torch.zeros(1, 1, 1, 2, dtype=torch.long)  # all class 0
    total, parts = losses.segmentation_loss(logits, target)
    # CE: -(1/K) log 0.5 per voxel; Dice: class 0 1 - 2*1/(1+2) = 1/3, class 1 (absent) 1 -> mean 2/3
    assert parts["seg_ce"] == pytest.approx(-np.log(0.5) / 2, rel=1e-5)
    assert parts["seg_dice"] == pytest.approx(2 / 3, rel=1e-5)
    assert float(total) == pytest.approx(-np.log(0.5) / 2 + 2 / 3, rel=1e-5)
    _, ours = losses.segmentation_loss(logits, target, style="brainid")
    assert ours["seg_ce"] == pytest.approx(-np.log(0.5), rel=1e-5)  # unweighted CE, present classes only
    assert ours["seg_dice"] == pytest.approx(1 / 3, rel=1e-4)


def test_curriculum_acts_through_the_training_data(tmp_path):
    nib.save(nib.Nifti1Image(phantom(), np.eye(4)), str(tmp_path / "s0.nii.gz"))
    cfg = load_config(None, [f"data.labels={tmp_path}", "data.size=[16,16,16]", "data.mild=2", "data.severe=2"])
    data = dict(cfg["data"])
    data["generator"] = {"preset": "brainid", "schedule": "curriculum", "curriculum_steps": 100}
    steps = GeneratorSteps(data, seed=0)
    early = [steps[s]["severity"] for s in range(3)]
    late = [steps[s]["severity"] for s in (150, 151, 152)]
    assert all(float(s.sum()) == 0 for s in early)  # no severe sample at the start
    assert all(int((s == 1).sum()) == 2 for s in late)  # exactly the official 2 + 2 mix at the end
    data["generator"] = {"preset": "brainid"}  # the default stays the fixed official mix at any step
    fixed = GeneratorSteps(data, seed=0)
    assert fixed[0]["severity"].tolist() == fixed[150]["severity"].tolist() == [0, 0, 1, 1]


def test_crop_sizes_are_drawn_per_step(tmp_path):
    nib.save(nib.Nifti1Image(phantom(), np.eye(4)), str(tmp_path / "s0.nii.gz"))
    cfg = load_config(None, [f"data.labels={tmp_path}", "data.size=[[16,16,16],[24,16,24]]", "data.size_probs=[0.5,0.5]",
                             "data.mild=1", "data.severe=0"])
    steps = GeneratorSteps(dict(cfg["data"]), seed=0)
    shapes = {tuple(steps[s]["inputs"].shape[2:]) for s in range(12)}
    assert shapes == {(16, 16, 16), (24, 16, 24)}
    assert steps[5]["inputs"].shape == GeneratorSteps(dict(cfg["data"]), seed=0)[5]["inputs"].shape


def head_labels(shape=(40, 44, 40)) -> torch.Tensor:
    """The phantom brain inside a scalp (507) and a skull (515) shell, with air around."""
    lab = np.zeros(shape, np.int16)
    axes = [np.linspace(-1, 1, n) for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    r = np.sqrt((x / 0.9) ** 2 + (y / 0.9) ** 2 + (z / 0.9) ** 2)
    lab[r < 1.0] = 507
    lab[r < 0.9] = 515
    inner = phantom(tuple(int(round(n * 0.72)) for n in shape))
    lo = [(n - m) // 2 for n, m in zip(shape, inner.shape)]
    box = tuple(slice(a, a + m) for a, m in zip(lo, inner.shape))
    lab[box] = np.where(inner > 0, inner, lab[box])
    return torch.from_numpy(lab)


def test_skull_stripped_samples_render_extra_cerebral_tissue_as_background():
    lab = head_labels()
    gen = SubjectGenerator(size=(32, 32, 32), n_mild=2, n_severe=0, skull_strip_prob=1.0, bg_zero_prob=1.0,
                           rotation=0.0, shear=0.0, scale=(1.0, 1.0), nonlin_std_max=0.0, flip_prob=0.0,
                           resolution_probs=((1, 0, 0, 0), (1, 0, 0, 0)))
    d = gen(lab, seed=3)
    assert bool(d["params"]["skull_stripped"].all())
    extra = d["labels"] >= 500
    air = d["labels"] == 0
    for x in d["inputs"][:, 0]:
        assert float(x[extra].mean()) == pytest.approx(float(x[air].mean()), abs=0.02)
    kept = SubjectGenerator(size=(32, 32, 32), n_mild=2, n_severe=0, bg_zero_prob=1.0, rotation=0.0, shear=0.0,
                            scale=(1.0, 1.0), nonlin_std_max=0.0, flip_prob=0.0)(lab, seed=3)
    assert not bool(kept["params"]["skull_stripped"].any())
    assert all(float(x[extra].mean()) > float(x[air].mean()) + 0.05 for x in kept["inputs"][:, 0])
    assert torch.equal(kept["segmentation"], d["segmentation"])  # same anatomy target either way


def test_head_centred_crops_reach_beyond_the_brain():
    lab = head_labels((56, 60, 56))
    def brain_centroids(p):
        gen = SubjectGenerator(size=(24, 24, 24), n_mild=1, n_severe=0, head_centre_prob=p, rotation=0.0, shear=0.0,
                               scale=(1.0, 1.0), nonlin_std_max=0.0, flip_prob=0.0)
        out = []
        for s in range(12):
            brain = (gen(lab, seed=s)["segmentation"] > 0).float()
            out.append(brain.mean())
        return torch.stack(out)
    near, anywhere = brain_centroids(0.0), brain_centroids(1.0)
    assert float(near.min()) > 0.3  # brain-centred crops are mostly brain
    assert float(anywhere.min()) < 0.15  # some head-centred crops hold scalp, skull and air


def test_robust_generator_inputs_are_the_inference_normalisation():
    lab = head_labels()
    kw = dict(size=(32, 32, 32), n_mild=1, n_severe=1, preset="brainid-extended")
    official = SubjectGenerator(**kw)(lab, seed=5)
    robust = SubjectGenerator(normalisation="robust", **kw)(lab, seed=5)
    for a, b in zip(official["inputs"], robust["inputs"]):
        # robust scaling is invariant to the official division by the max: same image, same result
        assert torch.allclose(normalise_tensor(a, ROBUST)[0], b, atol=1e-4)


def test_time_budget_checkpoints_and_exports(tmp_path):
    """run.max_minutes (the GPU recipe's time box): stop after the budget, keep a resumable checkpoint
    and export the model at the step reached."""
    from training.cli import main
    from training.engine import read_log

    labels = tmp_path / "labels"
    labels.mkdir()
    nib.save(nib.Nifti1Image(phantom(), np.eye(4)), str(labels / "s0.nii.gz"))
    run = tmp_path / "run"
    common = ["--config", "smoke", "--set", f"data.labels={labels}", "--set", f"run.dir={run}"]
    assert main(["pretrain", *common, "--set", "run.max_steps=50", "--set", "run.max_minutes=0.0001"]) == 0
    summary = __import__("json").loads((run / "summary.json").read_text())
    assert summary["stopped_by_time_budget"] and summary["step"] == len(read_log(run)) < 50
    assert (run / "model.safetensors").is_file() and (run / "checkpoints" / "last.pt").is_file()
    import BrainIDLib

    assert BrainIDLib.load_model(run / "model.safetensors").metadata["training"]["steps"] == summary["step"]


def test_pretraining_fits_contrast_dependent_heads_on_detached_features(tmp_path):
    """loss.super_resolution / loss.bias_field train those heads beside the backbone without
    shaping it (as heads on frozen features), and the exported model carries them."""
    from training.cli import main
    from training.config import load_config
    from training.distributed import DistInfo
    from training.pretrain import make_job

    labels = tmp_path / "labels"
    labels.mkdir()
    nib.save(nib.Nifti1Image(phantom(), np.eye(4)), str(labels / "s0.nii.gz"))
    sets = [f"data.labels={labels}", "loss.anatomy_l1=0", "loss.anatomy_grad=0", "loss.super_resolution=1",
            "loss.bias_field=1", "data.generator.normalisation=robust"]
    cfg = load_config("smoke", sets)
    job = make_job(cfg, DistInfo(device=torch.device("cpu")))
    loss, parts = job.loss(job.net, next(job.batches(0)), 0)
    assert {"sr_l1", "bias_l2"} <= set(parts)
    loss.backward()
    backbone = [p.grad for p in job.net.model.backbone.parameters()]
    assert all(g is None or float(g.abs().max()) == 0 for g in backbone)
    assert float(job.net.model.heads["bias_field"].conv.weight.grad.abs().max()) > 0
    run = tmp_path / "run"
    assert main(["pretrain", "--config", "smoke", *sum((["--set", s] for s in sets + [f"run.dir={run}"]), [])]) == 0
    import BrainIDLib as bid

    model = bid.load_model(run / "model.safetensors")
    assert {"super_resolution", "bias_field"} <= set(model.heads)
    assert model.metadata["input"]["normalisation"]["method"] == "robust"


def test_channels_last_training_matches_and_exports(tmp_path):
    """run.channels_last (the faster CPU memory format): the same loss curve as the default format
    on the same data, and an exported model that loads."""
    from training.cli import main
    from training.engine import read_log
    import BrainIDLib as bid

    labels = tmp_path / "labels"
    labels.mkdir()
    nib.save(nib.Nifti1Image(phantom(), np.eye(4)), str(labels / "s0.nii.gz"))
    curves = {}
    for cl in ("false", "true"):
        run = tmp_path / f"run_{cl}"
        assert main(["pretrain", "--config", "smoke", "--set", f"data.labels={labels}", "--set", f"run.dir={run}",
                     "--set", "run.max_steps=3", "--set", f"run.channels_last={cl}"]) == 0
        curves[cl] = [r["loss"] for r in read_log(run)]
        assert bid.load_model(run / "model.safetensors").arch.f_maps == 8
    np.testing.assert_allclose(curves["true"], curves["false"], rtol=2e-3)
